//! Process shutdown: SIGINT or SIGTERM flips one watch channel that every server
//! loop observes, so listeners stop accepting and in-flight requests finish.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// A receiver that becomes `true` on SIGINT or SIGTERM.
pub fn on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Resolves when the receiver turns `true` (or its sender is gone).
pub async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
