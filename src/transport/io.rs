//! The process's I/O thread: one tokio runtime on one thread, started on first use. It drains
//! send queues that sockets could not take at once, accepts and vets connections, runs
//! heartbeat timers, and frees big buffers kept unused. Nothing on it waits for user code.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle};

use crate::buffers;

/// The I/O runtime's handle (the runtime and its thread start on first use).
pub(crate) fn handle() -> &'static Handle {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let runtime = Builder::new_current_thread().enable_io().enable_time().build().expect("cannot start the I/O runtime");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("cman-io".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("cannot start the I/O thread");
        handle.spawn(async {
            loop {
                tokio::time::sleep(buffers::KEPT_FOR / 2).await;
                buffers::release_idle();
            }
        });
        handle
    })
}

/// Runs `task` on the I/O thread.
pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(task: F) -> tokio::task::JoinHandle<()> {
    handle().spawn(task)
}
