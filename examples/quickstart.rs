//! A first round trip with pgengine.
//!
//! Connects to `DATABASE_URL` when it is set; otherwise starts a throwaway PostgreSQL cluster
//! (`pgengine::testing::TempCluster`), so the example runs on any machine with the PostgreSQL
//! server binaries installed.
//!
//! ```text
//! cargo run --example quickstart
//! DATABASE_URL=postgres://me@localhost/mydb cargo run --example quickstart
//! ```

use pgengine::testing::TempCluster;
use pgengine::{Config, Connection};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the cluster alive until the end of main; dropping it stops the server.
    let mut cluster = None;
    let config = match std::env::var("DATABASE_URL") {
        Ok(url) => Config::parse(&url)?.with_env_defaults()?,
        Err(_) => {
            println!("DATABASE_URL is not set: starting a throwaway cluster…");
            let c = TempCluster::start()?;
            let config = Config::parse(&c.url(TempCluster::SUPERUSER))?;
            cluster = Some(c);
            config
        }
    };

    let mut conn = Connection::connect(&config).await?;
    println!(
        "connected to PostgreSQL {} as backend {}",
        conn.parameter("server_version").unwrap_or("?"),
        conn.process_id()
    );

    // The simple protocol: several statements in one string, values as text.
    let results = conn
        .simple_query(
            "CREATE TEMP TABLE bands (id serial PRIMARY KEY, name text NOT NULL, popularity int); \
             INSERT INTO bands (name, popularity) VALUES ('Pythonistas', 1000), ('Rustaceans', 2000)",
        )
        .await?;
    println!("{} rows inserted", results[1].rows_affected());

    // The extended protocol: typed parameters and typed rows in the binary format.
    let rows = conn
        .query((
            "SELECT name, popularity FROM bands WHERE popularity > $1 ORDER BY id",
            (500i32,),
        ))
        .await?;
    for row in &rows {
        let name: &str = row.get("name");
        let popularity: i32 = row.get("popularity");
        println!("  {name:<12} {popularity}");
    }

    // A query error comes back with its SQLSTATE, and the connection stays usable.
    let err = conn.simple_query("SELECT 1/0").await.unwrap_err();
    println!(
        "error as expected: SQLSTATE {} ({})",
        err.code().map_or("?", |code| code.as_str()),
        err
    );
    let row = conn
        .query_one(("SELECT $1::text || ' still works'", ("the connection",)))
        .await?;
    println!("{}", row.get::<_, &str>(0));

    conn.close().await?;
    drop(cluster);
    Ok(())
}
