//! File descriptors over a unix socket, the way libvirt passes them: a
//! message of type CALL_WITH_FDS (REPLY_WITH_FDS) carries the number of
//! descriptors before its arguments, and right after the message each
//! descriptor follows in a `sendmsg` of its own: one zero byte of data with
//! the descriptor as SCM_RIGHTS ancillary data. The byte keeps the stream
//! in step: a reader takes exactly one byte per descriptor.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

/// The most descriptors one libvirt message carries (`VIR_NET_MESSAGE_NUM_FDS_MAX`).
pub const MAX_FDS: usize = 32;

/// Ancillary-data buffer, aligned for `cmsghdr`: room for a few descriptors,
/// so that a peer sending more than one with a byte is seen (and refused)
/// rather than silently truncated.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Sends `fd` as libvirt does after a message: one zero byte carrying it.
pub async fn send_fd(stream: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || send_fd_now(stream.as_raw_fd(), fd.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Receives one descriptor sent by [`send_fd`] (or libvirt): exactly one
/// byte carrying exactly one descriptor, else an error naming what came.
pub async fn recv_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recv_fd_now(stream.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

fn send_fd_now(socket: RawFd, fd: RawFd) -> io::Result<()> {
    let byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut control = Control([0; 64]);
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize,
            libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize,
        )
    };
    // SAFETY: an all-zero msghdr is a valid empty one; the fields set below
    // point to `iov` and `control`, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of `space` bytes (≤ 64, aligned for
    // cmsghdr), so CMSG_FIRSTHDR is non-null and its data has room for one fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` is fully initialised and its buffers are live.
    match unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) } {
        1 => Ok(()),
        -1 => Err(io::Error::last_os_error()),
        n => Err(io::Error::other(format!(
            "sendmsg sent {n} bytes with a descriptor, not 1"
        ))),
    }
}

fn recv_fd_now(socket: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = Control([0; 64]);
    // SAFETY: as in send_fd_now; recvmsg fills at most the lengths given.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points to live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Every descriptor that arrived is owned (and closed) here, whatever
    // else is wrong with the message.
    let mut received: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed cmsgs
    // into `control`; CMSG_NXTHDR stays within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    received.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection where a file descriptor was due",
        ));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent more file descriptors with one byte than libvirt does",
        ));
    }
    match received.len() {
        1 => Ok(received.remove(0)),
        0 => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a byte came where a file descriptor was due, without one",
        )),
        k => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{k} file descriptors came with one byte where libvirt sends one"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_descriptor_crosses_and_still_opens_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile_in_tmp("fdpass");
        file.write_all(b"passed").unwrap();
        send_fd(&a, std::os::fd::AsFd::as_fd(&file)).await.unwrap();
        let got = recv_fd(&b).await.unwrap();
        let mut same = std::fs::File::from(got);
        same.rewind().unwrap();
        let mut text = String::new();
        same.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed");
    }

    #[tokio::test]
    async fn a_plain_byte_or_a_closed_peer_is_not_a_descriptor() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").await.unwrap();
        let e = recv_fd(&b).await.unwrap_err();
        assert!(e.to_string().contains("without one"), "{e}");
        drop(a);
        let e = recv_fd(&b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    fn tempfile_in_tmp(tag: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("libvirt-wire-{tag}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
