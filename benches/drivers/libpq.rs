//! Just enough of libpq (through `pq-sys`, the system's libpq) for the baselines: a connection
//! and a result that free themselves, and the error text libpq gives when something fails.

use std::ffi::{CStr, CString, c_char, c_int};
use std::ptr;

use pq_sys::{
    ConnStatusType, ExecStatusType, Oid, PGconn, PGresult, PQclear, PQconnectdb, PQerrorMessage,
    PQexecPrepared, PQfinish, PQgetlength, PQgetvalue, PQlibVersion, PQnfields, PQntuples,
    PQprepare, PQresultErrorMessage, PQresultStatus, PQstatus,
};

use crate::BenchResult;

/// The libpq the baselines link to, e.g. `15.18`.
pub fn version() -> String {
    // SAFETY: PQlibVersion takes no arguments and only returns a number.
    let v = unsafe { PQlibVersion() };
    format!("{}.{}", v / 10_000, v % 10_000)
}

/// An open libpq connection, finished on drop.
pub struct Conn(*mut PGconn);

impl Conn {
    /// PQconnectdb with a `key=value` string or URL; fails with libpq's message.
    pub fn connect(conninfo: &str) -> BenchResult<Conn> {
        let conninfo = CString::new(conninfo)?;
        // SAFETY: conninfo is a valid C string; PQconnectdb returns an owned handle (or null
        // when out of memory), which `Conn` finishes on drop.
        let conn = Conn(unsafe { PQconnectdb(conninfo.as_ptr()) });
        if conn.0.is_null() {
            return Err("libpq could not allocate a connection".into());
        }
        // SAFETY: conn.0 is a live handle.
        if unsafe { PQstatus(conn.0) } != ConnStatusType::CONNECTION_OK {
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
            PQprepare(self.0, name.as_ptr(), sql.as_ptr(), n, param_types.as_ptr())
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
        assert!(values.len() == lengths.len() && values.len() == formats.len());
        let n = c_int::try_from(values.len())?;
        // SAFETY: the three arrays have `n` entries each, and every value points at
        // `lengths[i]` readable bytes for the duration of the call (the caller's contract).
        let result = unsafe {
            PQexecPrepared(
                self.0,
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

    /// Takes ownership of a result; null means libpq failed before the server answered.
    fn result(&self, result: *mut PGresult) -> BenchResult<PgResult> {
        if result.is_null() {
            Err(format!("libpq: {}", self.error_message()).into())
        } else {
            Ok(PgResult(result))
        }
    }

    fn error_message(&self) -> String {
        // SAFETY: PQerrorMessage returns a C string owned by the live connection.
        unsafe { CStr::from_ptr(PQerrorMessage(self.0)) }
            .to_string_lossy()
            .trim_end()
            .to_owned()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the handle came from PQconnectdb and is finished exactly once.
        unsafe { PQfinish(self.0) };
        self.0 = ptr::null_mut();
    }
}

/// A query result, cleared on drop.
pub struct PgResult(*mut PGresult);

impl PgResult {
    fn expect(&self, status: ExecStatusType) -> BenchResult<()> {
        // SAFETY: self.0 is a live result.
        let got = unsafe { PQresultStatus(self.0) };
        if got == status {
            return Ok(());
        }
        // SAFETY: as above; the message is owned by the result.
        let message = unsafe { CStr::from_ptr(PQresultErrorMessage(self.0)) };
        Err(format!(
            "libpq: expected {status:?}, got {got:?}: {}",
            message.to_string_lossy().trim_end()
        )
        .into())
    }

    /// The value of the only column of the only row, which must be a binary int4.
    pub fn single_int4(&self) -> BenchResult<i32> {
        // SAFETY: self.0 is a live result; the indexes are checked against its shape before
        // PQgetvalue, and the value is read within its PQgetlength bytes.
        unsafe {
            if PQntuples(self.0) != 1 || PQnfields(self.0) != 1 {
                return Err("libpq: expected one row with one column".into());
            }
            if PQgetlength(self.0, 0, 0) != 4 {
                return Err("libpq: expected a 4-byte binary int4".into());
            }
            let value = PQgetvalue(self.0, 0, 0).cast::<[u8; 4]>().read_unaligned();
            Ok(i32::from_be_bytes(value))
        }
    }
}

impl Drop for PgResult {
    fn drop(&mut self) {
        // SAFETY: the result came from libpq and is cleared exactly once.
        unsafe { PQclear(self.0) };
    }
}
