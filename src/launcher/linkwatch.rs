//! Notice when the LAN macvtap goes away, from the kernel's own link notifications (rtnetlink multicast group
//! `RTNLGRP_LINK`), not by polling. A link that is deleted, or moved to another namespace, shows up as
//! `RTM_DELLINK` for its ifindex.

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;

use crate::error::{Error, Result};
use crate::link;

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A subscription to link notifications about one link.
pub struct LinkWatch {
    ifindex: u32,
    messages: Messages,
    gone_already: bool,
}

/// Whether a notification says that link `ifindex` is gone.
pub fn is_removal(msg: &NetlinkMessage<RouteNetlinkMessage>, ifindex: u32) -> bool {
    matches!(&msg.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) if l.header.index == ifindex)
}

impl LinkWatch {
    /// Subscribe (inside a tokio runtime), then check that the link still exists, so a removal between opening
    /// the tap and subscribing is not missed.
    pub async fn subscribe(ifindex: u32) -> Result<LinkWatch> {
        let (conn, handle, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(|e| {
            Error::io(format!("subscribe to link notifications for the LAN link (ifindex {ifindex})"), e)
        })?;
        tokio::spawn(conn);
        let gone_already = link::get_by_index(&handle, ifindex).await?.is_none();
        Ok(LinkWatch { ifindex, messages, gone_already })
    }

    /// Resolves when the link is gone. If the notification socket fails, watching stops (with a warning) and
    /// this never resolves.
    pub async fn gone(&mut self) {
        if self.gone_already {
            return;
        }
        while let Some((msg, _)) = self.messages.next().await {
            if is_removal(&msg, self.ifindex) {
                self.gone_already = true;
                return;
            }
        }
        tracing::warn!("link notifications ended; no longer watching the LAN link");
        std::future::pending::<()>().await
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
    }
}
