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
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { lines: BufReader::new(r).lines(), writer: w };
        let greeting = qmp.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Runtime(format!("QMP {}: unexpected greeting {greeting}", path.display())));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
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
}
