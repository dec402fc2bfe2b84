//! A minimal QMP client over a unix socket: the greeting, `qmp_capabilities`, then commands such as
//! `query-status`, `system_powerdown` and `quit`.
//!
//! [`Qmp`] is the plain request/reply client (events between replies are skipped). [`Qmp::into_client`]
//! turns it into a long-lived connection served by a task: commands go through a cloneable [`QmpClient`],
//! events arrive on a channel of their own. The launcher keeps such a connection to QEMU from start to end.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// When QEMU emitted it (QMP's `timestamp`), as seconds since the Unix epoch.
    pub timestamp: Option<f64>,
}

impl QmpEvent {
    fn from_json(v: &Value) -> Option<QmpEvent> {
        let name = v.get("event")?.as_str()?.to_owned();
        let ts = v.get("timestamp");
        let timestamp = ts.and_then(|t| Some(t.get("seconds")?.as_f64()? + t.get("microseconds")?.as_f64()? / 1e6));
        Some(QmpEvent { name, data: v.get("data").cloned().unwrap_or(Value::Null), timestamp })
    }
}

type Reply = oneshot::Sender<Result<Value>>;

/// A command for the connection task: its name (for messages), the JSON line to send, where the reply goes.
type Request = (String, String, Reply);

/// Sends commands to a connection served by [`Qmp::into_client`]'s task.
#[derive(Clone)]
pub(crate) struct QmpClient {
    tx: mpsc::UnboundedSender<Request>,
}

impl QmpClient {
    /// A client with no connection: every command fails at once.
    pub(crate) fn closed() -> QmpClient {
        QmpClient { tx: mpsc::unbounded_channel().0 }
    }

    /// Run a command without arguments; fails when the connection is gone. Bound it with a timeout.
    pub(crate) async fn execute(&self, command: &str) -> Result<Value> {
        self.send(command, serde_json::json!({ "execute": command })).await
    }

    /// Run a command with arguments (a JSON object), e.g. `send-key`.
    pub(crate) async fn execute_with(&self, command: &str, arguments: Value) -> Result<Value> {
        self.send(command, serde_json::json!({ "execute": command, "arguments": arguments })).await
    }

    async fn send(&self, command: &str, message: Value) -> Result<Value> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((command.to_owned(), message.to_string() + "\n", reply))
            .map_err(|_| Error::Runtime(format!("QMP {command}: the connection to QEMU is closed")))?;
        rx.await.map_err(|_| Error::Runtime(format!("QMP {command}: QEMU closed the connection")))?
    }
}

pub(super) struct Qmp {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
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

    /// The handshake on an already connected stream (e.g. one end of a socket pair whose other end QEMU got).
    pub(super) async fn from_stream(stream: UnixStream, what: &Path) -> Result<Qmp> {
        Qmp::handshake(stream, what).await
    }

    /// Hand the connection to a task: commands through the returned client (replies in order), events on the
    /// receiver. Both end when QEMU closes the connection.
    pub(super) fn into_client(self) -> (QmpClient, mpsc::UnboundedReceiver<QmpEvent>) {
        let (tx, mut commands) = mpsc::unbounded_channel::<Request>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let Qmp { mut lines, mut writer } = self;
        tokio::spawn(async move {
            let mut waiting: std::collections::VecDeque<(String, Reply)> = std::collections::VecDeque::new();
            let mut commands_open = true;
            loop {
                tokio::select! {
                    cmd = commands.recv(), if commands_open => match cmd {
                        Some((command, msg, reply)) => {
                            if let Err(e) = writer.write_all(msg.as_bytes()).await {
                                let _ = reply.send(Err(Error::io(format!("QMP {command}"), e)));
                                return;
                            }
                            waiting.push_back((command, reply));
                        }
                        None => commands_open = false,
                    },
                    line = lines.next_line() => {
                        let line = match line {
                            Ok(Some(l)) => l,
                            _ => return,
                        };
                        let Ok(v) = serde_json::from_str::<Value>(&line) else {
                            tracing::warn!("QMP: bad JSON {line:?}");
                            continue;
                        };
                        if let Some(ev) = QmpEvent::from_json(&v) {
                            tracing::debug!("QMP event {} {}", ev.name, ev.data);
                            let _ = events_tx.send(ev);
                        } else if let Some((command, reply)) = waiting.pop_front() {
                            let _ = reply.send(reply_value(&command, v));
                        }
                    }
                }
            }
        });
        (QmpClient { tx }, events)
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
    pub(super) async fn execute(&mut self, command: &str) -> Result<Value> {
        let msg = serde_json::json!({ "execute": command }).to_string() + "\n";
        self.writer.write_all(msg.as_bytes()).await.map_err(|e| Error::io(format!("QMP {command}"), e))?;
        loop {
            let v = self.next_message().await.map_err(|e| Error::Runtime(format!("QMP {command}: {e}")))?;
            if let Some(ev) = v.get("event") {
                tracing::debug!("QMP event {ev}");
                continue;
            }
            return reply_value(command, v);
        }
    }
}

fn reply_value(command: &str, v: Value) -> Result<Value> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let desc = v.get("error").and_then(|e| e.get("desc")).and_then(Value::as_str).unwrap_or("unexpected reply");
    Err(Error::Runtime(format!("QMP {command}: {desc}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// Connect, read the greeting and leave capabilities negotiation mode.
    async fn connect(path: &Path) -> Result<Qmp> {
        let stream =
            UnixStream::connect(path).await.map_err(|e| Error::io(format!("connect to QMP {}", path.display()), e))?;
        Qmp::handshake(stream, path).await
    }

    /// Like [`connect`], but waits (polling every 50 ms) while QEMU has not created or is not yet
    /// listening on the socket: a stop request can arrive right after QEMU was spawned. Bound it with a timeout.
    async fn connect_when_ready(path: &Path) -> Result<Qmp> {
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
            let mut q = connect(&path).await.unwrap();
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
            assert!(connect(&path).await.is_err(), "plain connect fails while the socket is missing");
            let mut q = tokio::time::timeout(std::time::Duration::from_secs(5), connect_when_ready(&path))
                .await
                .expect("connected before the timeout")
                .unwrap();
            q.execute("quit").await.unwrap();
            drop(q);
            assert_eq!(server.await.unwrap(), 2, "one connection: capabilities and quit");
        });
    }

    /// The long-lived client: replies in order, events on their own channel with their timestamps, and both
    /// end when the peer closes.
    #[test]
    fn client_task_splits_replies_and_events() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let server = tokio::spawn(async move {
                let (r, mut w) = theirs.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
                lines.next_line().await.unwrap();
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                lines.next_line().await.unwrap();
                w.write_all(
                    b"{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 500000}, \"event\": \"STOP\"}\n",
                )
                .await
                .unwrap();
                w.write_all(b"{\"return\": {\"status\": \"internal-error\", \"running\": false}}\n").await.unwrap();
                let with_args = lines.next_line().await.unwrap().unwrap();
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                with_args
            });
            let (client, mut events) = Qmp::from_stream(ours, Path::new("pair")).await.unwrap().into_client();
            let st = client.execute("query-status").await.unwrap();
            assert_eq!(st["status"], "internal-error");
            let ev = events.recv().await.unwrap();
            assert_eq!(ev.name, "STOP");
            assert_eq!(ev.timestamp, Some(1_700_000_000.5));
            let keys = serde_json::json!({ "keys": [{ "type": "qcode", "data": "ret" }] });
            assert_eq!(client.execute_with("send-key", keys.clone()).await.unwrap(), serde_json::json!({}));
            let sent: Value = serde_json::from_str(&server.await.unwrap()).unwrap();
            assert_eq!(sent, serde_json::json!({ "execute": "send-key", "arguments": keys }));
            assert!(events.recv().await.is_none(), "events end with the connection");
            assert!(client.execute("quit").await.is_err());
        });
    }
}
