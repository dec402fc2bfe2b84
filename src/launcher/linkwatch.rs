//! Notice when the LAN macvtap goes away, from the kernel's own link notifications (rtnetlink multicast group
//! `RTNLGRP_LINK`), not by polling. A link that is deleted, or moved to another namespace, shows up as
//! `RTM_DELLINK` for its ifindex.

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{AsyncSocket, SocketAddr};

use crate::error::{Error, Result};
use crate::link;

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A subscription to link notifications about one link.
pub struct LinkWatch {
    ifindex: u32,
    handle: rtnetlink::Handle,
    messages: Messages,
    gone_already: bool,
}

/// Why [`LinkWatch::gone`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// The link is gone (a notification said so, or a re-check after lost notifications found it missing).
    Removed,
    /// Watching is no longer possible (the notification stream ended or a re-check failed): the launcher
    /// cannot vouch for the link any more.
    WatchLost(String),
}

/// Whether a notification says that link `ifindex` is gone.
pub(super) fn is_removal(msg: &NetlinkMessage<RouteNetlinkMessage>, ifindex: u32) -> bool {
    matches!(&msg.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) if l.header.index == ifindex)
}

/// Whether notifications were lost (the socket's receive buffer overflowed: ENOBUFS).
pub(super) fn is_overrun(msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
    matches!(&msg.payload, NetlinkPayload::Overrun(_))
}

impl LinkWatch {
    /// Subscribe (inside a tokio runtime), then check that the link still exists, so a removal between opening
    /// the tap and subscribing is not missed.
    pub async fn subscribe(ifindex: u32) -> Result<LinkWatch> {
        Self::subscribe_with_buffer(ifindex, None).await
    }

    /// [`LinkWatch::subscribe`] with a given socket receive buffer (tests use a tiny one to force overruns).
    pub async fn subscribe_with_buffer(ifindex: u32, rcvbuf: Option<usize>) -> Result<LinkWatch> {
        let what = || format!("subscribe to link notifications for the LAN link (ifindex {ifindex})");
        let (mut conn, handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(|e| Error::io(what(), e))?;
        if let Some(size) = rcvbuf {
            conn.socket_mut().socket_ref().set_rx_buf_sz(size).map_err(|e| Error::io(what(), e))?;
        }
        tokio::spawn(conn);
        let gone_already = link::get_by_index(&handle, ifindex).await?.is_none();
        Ok(LinkWatch { ifindex, handle, messages, gone_already })
    }

    /// Resolves when the link is gone, or when it can no longer be watched. Lost notifications (an overrun)
    /// are answered by looking the link up by index again, so a dropped RTM_DELLINK is never missed.
    pub async fn gone(&mut self) -> LinkEnd {
        if self.gone_already {
            return LinkEnd::Removed;
        }
        while let Some((msg, _)) = self.messages.next().await {
            if is_removal(&msg, self.ifindex) {
                self.gone_already = true;
                return LinkEnd::Removed;
            }
            if is_overrun(&msg) {
                tracing::debug!("link notifications overran; checking the LAN link (ifindex {}) again", self.ifindex);
                match link::get_by_index(&self.handle, self.ifindex).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        self.gone_already = true;
                        return LinkEnd::Removed;
                    }
                    Err(e) => return LinkEnd::WatchLost(format!("re-checking the link after lost notifications: {e}")),
                }
            }
        }
        LinkEnd::WatchLost("the kernel's link notifications ended".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkMessage;

    #[test]
    fn only_dellink_of_our_index_counts() {
        let mut l = LinkMessage::default();
        l.header.index = 7;
        let del = NetlinkMessage::from(RouteNetlinkMessage::DelLink(l.clone()));
        let new = NetlinkMessage::from(RouteNetlinkMessage::NewLink(l));
        assert!(is_removal(&del, 7));
        assert!(!is_removal(&del, 8));
        assert!(!is_removal(&new, 7));
        let overrun = NetlinkMessage::<RouteNetlinkMessage>::new(Default::default(), NetlinkPayload::Overrun(vec![]));
        assert!(is_overrun(&overrun) && !is_removal(&overrun, 7));
    }
}
