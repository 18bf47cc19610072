//! Just enough of libpq for the baselines: a connection and a result that free themselves, the
//! error text libpq gives when something fails, and the calls the workloads use (prepared
//! statements, single-row and chunked-rows modes, pipeline mode, COPY FROM STDIN).
//!
//! Every call goes through a table of functions, [`Api`], so the same code runs on two
//! libraries: the system's libpq, linked through `pq-sys` ([`SYSTEM`]), and a second libpq
//! loaded at run time ([`load`]) — libpq 18, which has chunked rows mode (`PQsetChunkedRowsMode`)
//! where the system's libpq 15 does not. Both are called `libpq.so.5`, so the second one is
//! opened with `RTLD_DEEPBIND`: without it, its calls to its own exported functions (libpq calls
//! `PQclear`, `PQgetResult`, … internally through the PLT) would bind to the system libpq
//! already loaded, whose structures have another layout.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::Path;
use std::ptr;

use pq_sys::{ConnStatusType, ExecStatusType, Oid, PGconn, PGresult};

use crate::BenchResult;

/// Declares [`Api`] with one field per libpq function (named as in C), the table of the
/// linked libpq, and a loader that looks every function up in a library opened at run time.
macro_rules! libpq_api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// libpq's functions, from one library.
        #[allow(non_snake_case)]
        pub struct Api {
            $($name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            /// `PQsetChunkedRowsMode`, from libpq 17 on; the system's libpq 15 lacks it, so it
            /// is only ever found in a library loaded at run time.
            PQsetChunkedRowsMode: Option<unsafe extern "C" fn(*mut PGconn, c_int) -> c_int>,
        }

        /// The system's libpq, linked at build time through `pq-sys`.
        pub static SYSTEM: Api = Api {
            $($name: pq_sys::$name,)*
            PQsetChunkedRowsMode: None,
        };

        impl Api {
            /// Looks every function up in `lib`; fails naming the first one missing.
            fn from_library(lib: &'static libloading::os::unix::Library) -> BenchResult<Api> {
                // SAFETY: each symbol is looked up with the C signature libpq declares for it
                // (the same declarations `pq-sys` has), and the library is never unloaded
                // (`lib` is 'static), so the function pointers stay valid.
                unsafe {
                    Ok(Api {
                        $($name: *lib
                            .get(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| format!("libpq: {}: {e}", stringify!($name)))?,)*
                        PQsetChunkedRowsMode: lib
                            .get(b"PQsetChunkedRowsMode\0")
                            .ok()
                            .map(|f| *f),
                    })
                }
            }
        }
    };
}

libpq_api! {
    PQlibVersion: fn() -> c_int;
    PQconnectdb: fn(*const c_char) -> *mut PGconn;
    PQstatus: fn(*const PGconn) -> ConnStatusType;
    PQerrorMessage: fn(*const PGconn) -> *mut c_char;
    PQfinish: fn(*mut PGconn);
    PQexec: fn(*mut PGconn, *const c_char) -> *mut PGresult;
    PQexecParams: fn(
        *mut PGconn, *const c_char, c_int, *const Oid, *const *const c_char, *const c_int,
        *const c_int, c_int
    ) -> *mut PGresult;
    PQprepare: fn(*mut PGconn, *const c_char, *const c_char, c_int, *const Oid) -> *mut PGresult;
    PQexecPrepared: fn(
        *mut PGconn, *const c_char, c_int, *const *const c_char, *const c_int, *const c_int,
        c_int
    ) -> *mut PGresult;
    PQsendQueryParams: fn(
        *mut PGconn, *const c_char, c_int, *const Oid, *const *const c_char, *const c_int,
        *const c_int, c_int
    ) -> c_int;
    PQsendQueryPrepared: fn(
        *mut PGconn, *const c_char, c_int, *const *const c_char, *const c_int, *const c_int,
        c_int
    ) -> c_int;
    PQsetSingleRowMode: fn(*mut PGconn) -> c_int;
    PQgetResult: fn(*mut PGconn) -> *mut PGresult;
    PQenterPipelineMode: fn(*mut PGconn) -> c_int;
    PQpipelineSync: fn(*mut PGconn) -> c_int;
    PQresultStatus: fn(*const PGresult) -> ExecStatusType;
    PQresultErrorMessage: fn(*const PGresult) -> *mut c_char;
    PQntuples: fn(*const PGresult) -> c_int;
    PQnfields: fn(*const PGresult) -> c_int;
    PQfformat: fn(*const PGresult, c_int) -> c_int;
    PQgetvalue: fn(*const PGresult, c_int, c_int) -> *mut c_char;
    PQgetlength: fn(*const PGresult, c_int, c_int) -> c_int;
    PQgetisnull: fn(*const PGresult, c_int, c_int) -> c_int;
    PQclear: fn(*mut PGresult);
    PQputCopyData: fn(*mut PGconn, *const c_char, c_int) -> c_int;
    PQputCopyEnd: fn(*mut PGconn, *const c_char) -> c_int;
    PQcmdTuples: fn(*mut PGresult) -> *mut c_char;
}

impl Api {
    /// The library's version, e.g. `15.18`.
    pub fn version(&self) -> String {
        // SAFETY: PQlibVersion takes no arguments and only returns a number.
        let v = unsafe { (self.PQlibVersion)() };
        format!("{}.{}", v / 10_000, v % 10_000)
    }

    /// True if this libpq has chunked rows mode (libpq 17 and later).
    pub fn has_chunked_rows_mode(&self) -> bool {
        self.PQsetChunkedRowsMode.is_some()
    }
}

/// The version of the system's libpq, e.g. `15.18`.
pub fn version() -> String {
    SYSTEM.version()
}

/// Opens a second libpq (a `libpq.so.5` file) for the rest of the process, with its own symbols
/// first (`RTLD_DEEPBIND`, see the module documentation).
pub fn load(path: &Path) -> BenchResult<&'static Api> {
    let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_DEEPBIND;
    // SAFETY: loading libpq runs no initialisers beyond the C runtime's; the library is leaked,
    // so it is never unloaded while its functions may be called.
    let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
        .map_err(|e| format!("could not load {}: {e}", path.display()))?;
    let lib: &'static _ = Box::leak(Box::new(lib));
    Ok(Box::leak(Box::new(Api::from_library(lib)?)))
}

/// An open libpq connection, finished on drop.
pub struct Conn {
    api: &'static Api,
    raw: *mut PGconn,
}

impl Conn {
    /// PQconnectdb on the system's libpq with a `key=value` string or URL.
    pub fn connect(conninfo: &str) -> BenchResult<Conn> {
        Conn::connect_with(&SYSTEM, conninfo)
    }

    /// PQconnectdb with the given libpq; fails with libpq's message.
    pub fn connect_with(api: &'static Api, conninfo: &str) -> BenchResult<Conn> {
        let conninfo = CString::new(conninfo)?;
        // SAFETY: conninfo is a valid C string; PQconnectdb returns an owned handle (or null
        // when out of memory), which `Conn` finishes on drop.
        let conn = Conn {
            api,
            raw: unsafe { (api.PQconnectdb)(conninfo.as_ptr()) },
        };
        if conn.raw.is_null() {
            return Err("libpq could not allocate a connection".into());
        }
        // SAFETY: conn.raw is a live handle.
        if unsafe { (api.PQstatus)(conn.raw) } != ConnStatusType::CONNECTION_OK {
            return Err(format!("libpq could not connect: {}", conn.error_message()).into());
        }
        Ok(conn)
    }

    /// PQprepare: a named statement with the given parameter types.
    pub fn prepare(&mut self, name: &CStr, sql: &str, param_types: &[Oid]) -> BenchResult<()> {
        let sql = CString::new(sql)?;
        let n = c_int::try_from(param_types.len())?;
        // SAFETY: every pointer is valid for the call; the result is owned by `PgResult`.
        let result = self.result(unsafe {
            (self.api.PQprepare)(
                self.raw,
                name.as_ptr(),
                sql.as_ptr(),
                n,
                param_types.as_ptr(),
            )
        })?;
        result.expect(ExecStatusType::PGRES_COMMAND_OK)
    }

    /// PQexecPrepared with a binary result. The parameter arrays are the caller's, so a hot
    /// loop allocates nothing of its own; each value must point at `lengths[i]` bytes.
    pub fn exec_prepared(
        &mut self,
        name: &CStr,
        values: &[*const c_char],
        lengths: &[c_int],
        formats: &[c_int],
    ) -> BenchResult<PgResult> {
        let n = param_count(values, lengths, formats)?;
        // SAFETY: the three arrays have `n` entries each, and every value points at
        // `lengths[i]` readable bytes for the duration of the call (the caller's contract).
        let result = unsafe {
            (self.api.PQexecPrepared)(
                self.raw,
                name.as_ptr(),
                n,
                values.as_ptr(),
                lengths.as_ptr(),
                formats.as_ptr(),
                1,
            )
        };
        let result = self.result(result)?;
        result.expect(ExecStatusType::PGRES_TUPLES_OK)?;
        Ok(result)
    }

    /// PQexec (the simple query protocol, text results), which must end with `status`.
    pub fn exec(&mut self, sql: &CStr, status: ExecStatusType) -> BenchResult<PgResult> {
        // SAFETY: sql is a valid C string; the result is owned by `PgResult`.
        let result = self.result(unsafe { (self.api.PQexec)(self.raw, sql.as_ptr()) })?;
        result.expect(status)?;
        Ok(result)
    }

    /// PQexecParams without parameters and with binary results: the extended protocol, so
    /// the rows come in binary, which must end with PGRES_TUPLES_OK.
    pub fn exec_binary(&mut self, sql: &CStr) -> BenchResult<PgResult> {
        // SAFETY: no parameters, so the null arrays are never read; the result is owned.
        let result = self.result(unsafe {
            (self.api.PQexecParams)(
                self.raw,
                sql.as_ptr(),
                0,
                ptr::null(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                1,
            )
        })?;
        result.expect(ExecStatusType::PGRES_TUPLES_OK)?;
        Ok(result)
    }

    /// PQsendQueryParams without parameters and with binary results; collect the answer with
    /// [`Conn::get_result`].
    pub fn send_binary(&mut self, sql: &CStr) -> BenchResult<()> {
        // SAFETY: no parameters, so the null arrays are never read.
        let sent = unsafe {
            (self.api.PQsendQueryParams)(
                self.raw,
                sql.as_ptr(),
                0,
                ptr::null(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                1,
            )
        };
        self.check(sent, "PQsendQueryParams")
    }

    /// PQsendQueryPrepared with a binary result (in pipeline mode, queued until the next
    /// [`Conn::pipeline_sync`]).
    pub fn send_prepared(
        &mut self,
        name: &CStr,
        values: &[*const c_char],
        lengths: &[c_int],
        formats: &[c_int],
    ) -> BenchResult<()> {
        let n = param_count(values, lengths, formats)?;
        // SAFETY: as in `exec_prepared`; libpq copies the values into its output buffer
        // before returning.
        let sent = unsafe {
            (self.api.PQsendQueryPrepared)(
                self.raw,
                name.as_ptr(),
                n,
                values.as_ptr(),
                lengths.as_ptr(),
                formats.as_ptr(),
                1,
            )
        };
        self.check(sent, "PQsendQueryPrepared")
    }

    /// PQsetSingleRowMode, right after sending a query: each row comes as its own result.
    pub fn set_single_row_mode(&mut self) -> BenchResult<()> {
        // SAFETY: self.raw is a live handle.
        let set = unsafe { (self.api.PQsetSingleRowMode)(self.raw) };
        self.check(set, "PQsetSingleRowMode")
    }

    /// PQsetChunkedRowsMode (libpq 17+), right after sending a query: rows come in results
    /// of up to `rows` rows each (PGRES_TUPLES_CHUNK).
    pub fn set_chunked_rows_mode(&mut self, rows: c_int) -> BenchResult<()> {
        let Some(set_chunked) = self.api.PQsetChunkedRowsMode else {
            return Err(format!(
                "libpq {} has no PQsetChunkedRowsMode (it came in libpq 17)",
                self.api.version()
            )
            .into());
        };
        // SAFETY: self.raw is a live handle of the library `set_chunked` came from.
        let set = unsafe { set_chunked(self.raw, rows) };
        self.check(set, "PQsetChunkedRowsMode")
    }

    /// PQgetResult: the next result of the query in flight, `None` when it has no more.
    pub fn get_result(&mut self) -> Option<PgResult> {
        // SAFETY: self.raw is a live handle; a non-null result is owned by `PgResult`.
        let result = unsafe { (self.api.PQgetResult)(self.raw) };
        (!result.is_null()).then_some(PgResult {
            api: self.api,
            raw: result,
        })
    }

    /// PQputCopyData: adds `data` to the COPY FROM STDIN in progress (libpq buffers it and
    /// sends when its buffer fills).
    pub fn put_copy_data(&mut self, data: &[u8]) -> BenchResult<()> {
        let len = c_int::try_from(data.len())?;
        // SAFETY: data is `len` readable bytes for the call; libpq copies them before
        // returning.
        let put = unsafe { (self.api.PQputCopyData)(self.raw, data.as_ptr().cast(), len) };
        self.check(put, "PQputCopyData")
    }

    /// PQputCopyEnd without an error message: the COPY's data is complete; its result comes
    /// from [`Conn::get_result`].
    pub fn put_copy_end(&mut self) -> BenchResult<()> {
        // SAFETY: a null error message means "end normally".
        let ended = unsafe { (self.api.PQputCopyEnd)(self.raw, ptr::null()) };
        self.check(ended, "PQputCopyEnd")
    }

    /// PQenterPipelineMode: queries are queued and sent together at each sync.
    pub fn enter_pipeline_mode(&mut self) -> BenchResult<()> {
        // SAFETY: self.raw is a live handle.
        let entered = unsafe { (self.api.PQenterPipelineMode)(self.raw) };
        self.check(entered, "PQenterPipelineMode")
    }

    /// PQpipelineSync: marks the end of a pipeline segment and sends what is queued.
    pub fn pipeline_sync(&mut self) -> BenchResult<()> {
        // SAFETY: self.raw is a live handle.
        let synced = unsafe { (self.api.PQpipelineSync)(self.raw) };
        self.check(synced, "PQpipelineSync")
    }

    /// libpq's calls answer 1 for success.
    fn check(&self, rc: c_int, what: &str) -> BenchResult<()> {
        if rc == 1 {
            Ok(())
        } else {
            Err(format!("libpq: {what} failed: {}", self.error_message()).into())
        }
    }

    /// Takes ownership of a result; null means libpq failed before the server answered.
    fn result(&self, result: *mut PGresult) -> BenchResult<PgResult> {
        if result.is_null() {
            Err(format!("libpq: {}", self.error_message()).into())
        } else {
            Ok(PgResult {
                api: self.api,
                raw: result,
            })
        }
    }

    fn error_message(&self) -> String {
        // SAFETY: PQerrorMessage returns a C string owned by the live connection.
        unsafe { CStr::from_ptr((self.api.PQerrorMessage)(self.raw)) }
            .to_string_lossy()
            .trim_end()
            .to_owned()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the handle came from PQconnectdb and is finished exactly once.
        unsafe { (self.api.PQfinish)(self.raw) };
        self.raw = ptr::null_mut();
    }
}

/// The number of parameters, when the three arrays agree on it.
fn param_count(
    values: &[*const c_char],
    lengths: &[c_int],
    formats: &[c_int],
) -> BenchResult<c_int> {
    if values.len() != lengths.len() || values.len() != formats.len() {
        return Err("libpq: parameter values, lengths and formats differ in number".into());
    }
    Ok(c_int::try_from(values.len())?)
}

/// A query result, cleared on drop.
pub struct PgResult {
    api: &'static Api,
    raw: *mut PGresult,
}

impl PgResult {
    /// PQresultStatus.
    pub fn status(&self) -> ExecStatusType {
        // SAFETY: self.raw is a live result.
        unsafe { (self.api.PQresultStatus)(self.raw) }
    }

    /// Fails with the server's message unless the result has `status`.
    pub fn expect(&self, status: ExecStatusType) -> BenchResult<()> {
        let got = self.status();
        if got == status {
            return Ok(());
        }
        // SAFETY: self.raw is a live result; the message is owned by it.
        let message = unsafe { CStr::from_ptr((self.api.PQresultErrorMessage)(self.raw)) };
        Err(format!(
            "libpq: expected {status:?}, got {got:?}: {}",
            message.to_string_lossy().trim_end()
        )
        .into())
    }

    /// PQcmdTuples: the row count of the command's tag (`COPY n` → n), 0 if it has none.
    pub fn cmd_tuples(&self) -> u64 {
        // SAFETY: self.raw is a live result; the string is owned by it and read before it is
        // cleared.
        let tuples = unsafe { CStr::from_ptr((self.api.PQcmdTuples)(self.raw)) };
        tuples
            .to_str()
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        // SAFETY: self.raw is a live result.
        let n = unsafe { (self.api.PQntuples)(self.raw) };
        usize::try_from(n).unwrap_or(0)
    }

    /// The number of columns.
    pub fn columns(&self) -> usize {
        // SAFETY: self.raw is a live result.
        let n = unsafe { (self.api.PQnfields)(self.raw) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Fails unless the result has `columns` columns, all in binary.
    pub fn expect_binary_columns(&self, columns: usize) -> BenchResult<()> {
        if self.columns() != columns {
            return Err(
                format!("libpq: expected {columns} columns, got {}", self.columns()).into(),
            );
        }
        for column in 0..columns as c_int {
            // SAFETY: self.raw is a live result and `column` is one of its columns.
            if unsafe { (self.api.PQfformat)(self.raw, column) } != 1 {
                return Err(format!("libpq: column {column} is not in binary").into());
            }
        }
        Ok(())
    }

    /// The value at (`row`, `column`) as it came on the wire, `None` for NULL. The indexes
    /// must be within [`PgResult::rows`] and [`PgResult::columns`].
    pub fn value(&self, row: usize, column: usize) -> Option<&[u8]> {
        debug_assert!(row < self.rows() && column < self.columns());
        let (row, column) = (row as c_int, column as c_int);
        // SAFETY: self.raw is a live result and (row, column) within its shape (the caller's
        // contract); the value is PQgetlength bytes owned by the result, which outlives the
        // returned slice.
        unsafe {
            if (self.api.PQgetisnull)(self.raw, row, column) == 1 {
                return None;
            }
            let len = (self.api.PQgetlength)(self.raw, row, column) as usize;
            let value = (self.api.PQgetvalue)(self.raw, row, column);
            Some(std::slice::from_raw_parts(value.cast::<u8>(), len))
        }
    }

    /// The value of the only column of the only row, which must be a binary int4.
    pub fn single_int4(&self) -> BenchResult<i32> {
        if self.rows() != 1 || self.columns() != 1 {
            return Err("libpq: expected one row with one column".into());
        }
        let value: [u8; 4] = self
            .value(0, 0)
            .and_then(|v| v.try_into().ok())
            .ok_or("libpq: expected a 4-byte binary int4")?;
        Ok(i32::from_be_bytes(value))
    }
}

impl Drop for PgResult {
    fn drop(&mut self) {
        // SAFETY: the result came from libpq and is cleared exactly once.
        unsafe { (self.api.PQclear)(self.raw) };
    }
}
