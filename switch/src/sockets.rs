//! Socket options shared by the node's listening sockets.

/// Asks for `bytes` of receive and send buffer (`SO_RCVBUF`/`SO_SNDBUF`) on `socket`, and
/// warns, naming `what` and the sysctl to raise, when the kernel grants less
/// (`net.core.rmem_max` caps it). 0 keeps the kernel's default.
pub fn size_buffers(
    socket: socket2::SockRef<'_>,
    bytes: usize,
    what: &'static str,
) -> std::io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    socket.set_recv_buffer_size(bytes)?;
    socket.set_send_buffer_size(bytes)?;
    // Linux reports twice what it grants (bookkeeping overhead included).
    let granted = socket.recv_buffer_size()? / 2;
    if granted < bytes {
        tracing::warn!(
            socket = what,
            asked = bytes,
            granted,
            "socket receive buffer capped by net.core.rmem_max; raise it (sysctl)"
        );
    }
    Ok(())
}
