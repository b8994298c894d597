//! The serial console (`[control] console = "/dev/ttyS0"`): a line prompt
//! with the CLI's commands, for when every network is down (Azure's serial
//! console). Raw mode through rustix; hadb echoes and edits the line
//! itself, and anything that is not printable text is dropped, so line
//! noise cannot run a command.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::run::control::{Handler, Request};

const PROMPT: &[u8] = b"hadb> ";
const MAX_LINE: usize = 256;
const HELP: &str = "commands:\r
  status [json]                 the pair, as `hadb status`\r
  standby on|off                hand the primary role over / take it back\r
  switchover                    move the primary role to the peer\r
  restart-in-place              re-execute hadb (an upgrade); MySQL stays up\r
  log                           the recent events\r
  mysql reset                   mysqld failed here: its cause is fixed, try again\r
  fence confirm NODE            NODE is powered off: let the pending fence succeed\r
  fence test                    check each fence method without fencing\r
  fence unfence NODE            start the fenced NODE again (azure)\r
  volume primary [--force]      volume secondary   volume go-alone   volume verify\r
  help\r
";

/// What a typed line asks for, as a control request; Err says why not.
pub fn parse(line: &str) -> Result<Option<Request>, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let req = |command: &str| Request {
        command: command.into(),
        force: false,
        node: None,
        on: None,
    };
    Ok(Some(match &w[..] {
        [] => return Ok(None),
        ["status"] | ["status", "json"] => req("status"),
        ["standby", on @ ("on" | "off")] => Request {
            on: Some(*on == "on"),
            ..req("standby")
        },
        ["switchover"] => req("switchover"),
        ["restart-in-place"] => req("restart-in-place"),
        ["log"] => req("log"),
        ["mysql", "reset"] => req("mysql.reset"),
        ["fence", "test"] => req("fence.test"),
        ["fence", "confirm", node] => Request {
            node: Some((*node).to_owned()),
            ..req("fence.confirm")
        },
        ["fence", "unfence", node] => Request {
            node: Some((*node).to_owned()),
            ..req("fence.unfence")
        },
        ["volume", "primary"] => req("volume.primary"),
        ["volume", "primary", "--force"] => Request {
            force: true,
            ..req("volume.primary")
        },
        [
            "volume",
            sub @ ("secondary" | "go-alone" | "verify" | "discard-my-data" | "down" | "up"),
        ] => req(&format!("volume.{sub}")),
        _ => return Err(format!("unknown command `{line}`; `help` lists them")),
    }))
}

fn raw(file: &std::fs::File) -> std::io::Result<()> {
    use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
    let mut t = tcgetattr(file.as_fd())?;
    t.make_raw();
    tcsetattr(file.as_fd(), OptionalActions::Now, &t)?;
    Ok(())
}

/// Serves the console until the daemon stops; reopens the device if it
/// goes away (a serial line hung up).
pub async fn serve<H: Handler>(path: &Path, handler: Arc<H>) {
    loop {
        if let Err(e) = session(path, &handler).await {
            log::warn!("console {}: {e}; reopening in 5 s", path.display());
        }
        smol::Timer::after(Duration::from_secs(5)).await;
    }
}

async fn session<H: Handler>(path: &Path, handler: &Arc<H>) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(path)?;
    raw(&file)?;
    let port = smol::Async::new(file)?;
    let write = |port: &smol::Async<std::fs::File>, bytes: &[u8]| {
        // A console nobody reads must not block the daemon: best effort.
        let _ = port.get_ref().write_all(bytes);
    };
    write(
        &port,
        b"\r\nhadb serial console; `help` lists the commands\r\n",
    );
    write(&port, PROMPT);
    let mut line = String::new();
    let mut buf = [0u8; 256];
    loop {
        port.readable().await?;
        let n = match port.get_ref().read(&mut buf) {
            Ok(0) => return Err(std::io::Error::other("the console closed")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        for &b in &buf[..n] {
            match b {
                b'\r' | b'\n' => {
                    write(&port, b"\r\n");
                    let answer = run_line(&line, handler).await;
                    write(&port, answer.as_bytes());
                    write(&port, PROMPT);
                    line.clear();
                }
                // Backspace / DEL.
                0x08 | 0x7f if !line.is_empty() => {
                    line.pop();
                    write(&port, b"\x08 \x08");
                }
                // Ctrl-C / Ctrl-U: drop the line.
                0x03 | 0x15 => {
                    line.clear();
                    write(&port, b"^C\r\n");
                    write(&port, PROMPT);
                }
                0x20..=0x7e if line.len() < MAX_LINE => {
                    line.push(b as char);
                    write(&port, &[b]);
                }
                _ => {}
            }
        }
    }
}

async fn run_line<H: Handler>(line: &str, handler: &Arc<H>) -> String {
    if line.trim() == "help" {
        return HELP.into();
    }
    let request = match parse(line) {
        Ok(Some(r)) => r,
        Ok(None) => return String::new(),
        Err(e) => return format!("{e}\r\n"),
    };
    let json_wanted = line.split_whitespace().nth(1) == Some("json");
    let text = match handler.handle(request).await {
        Ok(v) if line.trim_start().starts_with("status") && !json_wanted => {
            crate::run::human::status(&v)
        }
        Ok(v) if line.trim() == "log" => v["lines"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| x.as_str())
                    .map(|x| format!("{x}\n"))
                    .collect()
            })
            .unwrap_or_default(),
        Ok(v) if line.split_whitespace().eq(["fence", "test"]) => v["methods"]
            .as_array()
            .map(|checks| {
                checks
                    .iter()
                    .map(|c| {
                        format!(
                            "{}: {}: {}\n",
                            crate::run::human::s(&c["method"]),
                            if c["ok"] == serde_json::Value::Bool(true) {
                                "ok"
                            } else {
                                "FAILED"
                            },
                            crate::run::human::s(&c["detail"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Ok(v) if v.is_null() => "ok\n".into(),
        Ok(v) => format!("{v}\n"),
        Err(e) => format!("refused: {e}\n"),
    };
    text.replace('\n', "\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_requests() {
        assert!(parse("  ").unwrap().is_none());
        let r = parse("standby on").unwrap().unwrap();
        assert_eq!((r.command.as_str(), r.on), ("standby", Some(true)));
        let r = parse("fence confirm hadb01").unwrap().unwrap();
        assert_eq!(r.node.as_deref(), Some("hadb01"));
        let r = parse("fence unfence hadb01").unwrap().unwrap();
        assert_eq!(
            (r.command.as_str(), r.node.as_deref()),
            ("fence.unfence", Some("hadb01"))
        );
        let r = parse("fence test").unwrap().unwrap();
        assert_eq!(r.command, "fence.test");
        let r = parse("volume primary --force").unwrap().unwrap();
        assert!(r.force);
        assert!(parse("rm -rf /").is_err());
        assert!(parse("standby maybe").is_err());
    }
}
