//! A minimal QMP client over QEMU's unix socket: the greeting, `qmp_capabilities`, then commands such as
//! `system_powerdown` and `quit`. Events arriving between replies are logged and skipped.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::{Error, Result};

pub struct Qmp {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream =
            UnixStream::connect(path).await.map_err(|e| Error::io(format!("connect to QMP {}", path.display()), e))?;
        Qmp::handshake(stream, path).await
    }

    async fn handshake(stream: UnixStream, path: &Path) -> Result<Qmp> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { lines: BufReader::new(r).lines(), writer: w };
        let greeting = qmp.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Runtime(format!("QMP {}: unexpected greeting {greeting}", path.display())));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Like [`Qmp::connect`], but waits (polling every 50 ms) while QEMU has not created or is not yet
    /// listening on the socket: a stop request can arrive right after QEMU was spawned. Bound it with a timeout.
    pub async fn connect_when_ready(path: &Path) -> Result<Qmp> {
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Qmp::handshake(stream, path).await,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => return Err(Error::io(format!("connect to QMP {}", path.display()), e)),
            }
        }
    }

    async fn next_message(&mut self) -> Result<Value> {
        let line = self
            .lines
            .next_line()
            .await
            .map_err(|e| Error::io("read from QMP", e))?
            .ok_or_else(|| Error::Runtime("QMP: QEMU closed the connection".into()))?;
        serde_json::from_str(&line).map_err(|e| Error::Runtime(format!("QMP: bad JSON {line:?}: {e}")))
    }

    /// Run a command without arguments and return its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value> {
        let msg = serde_json::json!({ "execute": command }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await.map_err(|e| Error::io(format!("QMP {command}"), e))?;
        loop {
            let v = self.next_message().await.map_err(|e| Error::Runtime(format!("QMP {command}: {e}")))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(err) = v.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(Error::Runtime(format!("QMP {command}: {desc}")));
            }
            if let Some(ev) = v.get("event") {
                tracing::debug!("QMP event {ev}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greeting, then answers each command (with an event in between).
    #[test]
    fn talks_qmp() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
                let mut seen = Vec::new();
                while let Some(l) = lines.next_line().await.unwrap() {
                    let v: Value = serde_json::from_str(&l).unwrap();
                    let cmd = v["execute"].as_str().unwrap().to_owned();
                    if cmd == "bogus" {
                        w.write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}\n").await.unwrap();
                    } else {
                        w.write_all(b"{\"event\": \"POWERDOWN\", \"timestamp\": {}}\n{\"return\": {}}\n").await.unwrap();
                    }
                    seen.push(cmd);
                }
                seen
            });
            let mut q = Qmp::connect(&path).await.unwrap();
            assert_eq!(q.execute("system_powerdown").await.unwrap(), serde_json::json!({}));
            let err = q.execute("bogus").await.unwrap_err().to_string();
            assert!(err.contains("has not been found"), "{err}");
            drop(q);
            assert_eq!(server.await.unwrap(), ["qmp_capabilities", "system_powerdown", "bogus"]);
        });
    }

    /// A stop request right after spawning: the socket does not exist yet, then appears.
    #[test]
    fn waits_for_a_socket_that_appears_later() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("qmp.sock");
            let p2 = path.clone();
            let server = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let listener = UnixListener::bind(&p2).unwrap();
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
                let mut n = 0;
                while lines.next_line().await.unwrap().is_some() {
                    w.write_all(b"{\"return\": {}}\n").await.unwrap();
                    n += 1;
                }
                n
            });
            assert!(Qmp::connect(&path).await.is_err(), "plain connect fails while the socket is missing");
            let mut q = tokio::time::timeout(std::time::Duration::from_secs(5), Qmp::connect_when_ready(&path))
                .await
                .expect("connected before the timeout")
                .unwrap();
            q.execute("quit").await.unwrap();
            drop(q);
            assert_eq!(server.await.unwrap(), 2, "one connection: capabilities and quit");
        });
    }
}
