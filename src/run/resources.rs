//! What runs on top of the primary's volume, in order: the filesystem,
//! then mysqld. Up after the volume is primary (and attached); down, the
//! other way round, before it steps down.

use std::sync::Arc;

use smol::channel::Sender;

use crate::run::filesystem::{self, Managed};
use crate::run::mysqld::Mysqld;
use crate::run::volume::{Command, Event};

#[derive(Clone, Default)]
pub struct Resources {
    pub fs: Managed,
    pub mysqld: Option<Arc<Mysqld>>,
}

impl Resources {
    pub fn new(config: &crate::config::Config) -> Resources {
        Resources {
            fs: filesystem::managed(config),
            mysqld: config
                .mysql
                .as_ref()
                .filter(|m| m.supervise)
                .map(|m| crate::run::mysqld::spawn(m.clone())),
        }
    }

    /// The volume is primary and attached: mount, then start mysqld. A
    /// filesystem that will not mount leaves mysqld down (it would start
    /// on the empty directory underneath).
    pub async fn up(&self) {
        if let Some((dev, cfg)) = self.fs.clone() {
            let at = cfg.datadir.clone();
            // The kernel may take a moment to show the device.
            let tries = move || {
                let mut last = Ok(());
                for _ in 0..15 {
                    last = filesystem::mount(&dev, &cfg);
                    if last.is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                last
            };
            match smol::unblock(tries).await {
                Ok(()) => log::info!("filesystem: mounted at {}", at.display()),
                Err(e) => {
                    log::error!("filesystem: {e}; mysqld is not started");
                    return;
                }
            }
        }
        if let Some(m) = &self.mysqld {
            m.start();
        }
    }

    /// hadb restarted in place on a primary whose kernel device stayed
    /// attached: the filesystem should still be mounted (mount is a no-op
    /// then), and mysqld still running: it is adopted, not started again.
    pub async fn resume(&self) {
        if let Some((dev, cfg)) = self.fs.clone() {
            let at = cfg.datadir.clone();
            match smol::unblock(move || filesystem::mount(&dev, &cfg)).await {
                Ok(()) => log::info!("filesystem: mounted at {}", at.display()),
                Err(e) => {
                    log::error!("filesystem: {e}; mysqld is not started");
                    return;
                }
            }
        }
        if let Some(m) = &self.mysqld {
            m.resume();
        }
    }

    /// Stops mysqld and waits for it, unmounts; nothing of the service
    /// holds the volume any more.
    pub async fn down(&self) -> Result<(), String> {
        if let Some(m) = &self.mysqld {
            m.stop().await;
        }
        if let Some((device, cfg)) = self.fs.clone() {
            smol::unblock(move || filesystem::unmount(&device, &cfg)).await?;
        }
        Ok(())
    }

    /// Steps the volume down the way round: mysqld, the filesystem, then
    /// the volume.
    pub async fn demote(&self, events: &Sender<Event>) -> Result<serde_json::Value, String> {
        self.down().await?;
        crate::run::volume::ask(events, Command::Secondary).await
    }
}
