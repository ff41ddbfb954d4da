use clap::Parser;
use sensorhub::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    cli::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli::run(cli).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                // One line: what failed and, from the context chain, why.
                tracing::error!("{e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Caps glibc's heap arenas at two, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// glibc gives a thread that finds the heap locked an arena of its own, up to eight per core,
/// and memory freed into one arena is not reused by the others. sensorhub's threads (tokio's
/// workers and blocking pool, the broker's router and connections, the link tap) allocate on
/// one thread and free on another all the time, so under ingest load a dozen arenas each keep
/// tens of MB of free but fragmented pages: the benchmark's memory scenario (BENCHMARKS.md)
/// peaked at 159 MB with the default and at 92 MB with two arenas, at the same 28,000
/// readings/s. Must run before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets a tunable of glibc's allocator, takes no pointers, and runs
    // before this process starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
