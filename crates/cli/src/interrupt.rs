//! Ctrl-C (SIGINT) and SIGTERM as a state a command reads at its own safe points, instead of
//! a signal that kills the process mid-line: `export` stops after whole lines, `import`
//! after a committed batch, `watch` after the event it is printing.

use tokio::sync::watch;

/// The signal that asked the process to stop, once one has arrived.
#[derive(Debug, Clone)]
pub(crate) struct Interrupt(watch::Receiver<Option<Signal>>);

/// A signal [`Interrupt`] listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Ctrl-C.
    Int,
    /// `kill`, or a service manager stopping the command.
    Term,
}

impl Signal {
    /// The shell's exit code for a process stopped by this signal (128 + its number).
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Signal::Int => 130,
            Signal::Term => 143,
        }
    }
}

impl Interrupt {
    /// Starts listening. From here on the signals no longer end the process by themselves:
    /// the command must look at [`Interrupt::signal`] (or await [`Interrupt::wait`]).
    pub(crate) fn install() -> Self {
        let (tx, rx) = watch::channel(None);
        #[cfg(unix)]
        let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        tokio::spawn(async move {
            #[cfg(unix)]
            let term = async {
                match terminate {
                    Ok(mut t) => {
                        t.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            let signal = tokio::select! {
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => Signal::Int,
                    // No handler could be installed: the default behaviour stays.
                    Err(_) => return std::future::pending::<()>().await,
                },
                () = term => Signal::Term,
            };
            let _ = tx.send(Some(signal));
            // Keep the sender: a closed channel would read as "never interrupted".
            std::future::pending::<()>().await;
        });
        Self(rx)
    }

    /// The signal received, if any.
    pub(crate) fn signal(&self) -> Option<Signal> {
        *self.0.borrow()
    }

    /// Waits for a signal.
    pub(crate) async fn wait(&mut self) -> Signal {
        loop {
            if let Some(s) = *self.0.borrow_and_update() {
                return s;
            }
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
