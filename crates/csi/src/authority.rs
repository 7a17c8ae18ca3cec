//! Any `:authority` on the CSI socket.
//!
//! h2 (under hyper and tonic) parses every request's `:authority` as a URI
//! authority and resets the stream with PROTOCOL_ERROR when that fails (h2's
//! `server::Peer::convert_poll_message`, through `http::uri::Authority`, which
//! refuses a `%` outside the userinfo and any `/`). Over a unix socket there is no
//! host to name, and clients differ: the kubelet's CSI client and the sidecars
//! send `localhost` (their dialers set it), the kubelet's plugin watcher (a
//! grpc-go passthrough dial of the registration socket, no override) the path
//! percent-encoded (`%2Fvar%2Flib%2Fkubelet%2F...`), gRPC C-core (Python's grpcio, Ruby, C++) since 1.57 the socket path
//! percent-encoded (`%2Fcsi%2Fcsi.sock`), grpc-java the bare path. h2 has no
//! option to tolerate it (hyperium/h2#487 is still open), so [`relay`] sits
//! between the socket and h2: it copies every frame byte for byte, except that it
//! decodes each header block the client sends (HPACK, with the client's dynamic
//! table) and encodes it again as literals, with an authority h2 would refuse
//! replaced by `localhost`. The services never look at the authority.
//!
//! Only the client's HEADERS and CONTINUATION frames are touched: they carry no
//! flow-control credit, and the re-encoded block uses no dynamic table, so h2's
//! decoder and the client's encoder need not agree on one. A connection that does
//! not open with the HTTP/2 preface is passed through untouched (h2 answers it).

use std::io;

use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::codegen::http::uri::Authority;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer takes (SETTINGS_MAX_FRAME_SIZE's
/// initial value and least allowed one): re-encoded blocks are split at it.
const MAX_FRAME: usize = 16_384;
/// The largest header block taken, encoded or decoded. A CSI request's is a few
/// hundred bytes, and hyper refuses a header list above 16 KiB anyway; the bound
/// only keeps a misbehaving client from making the relay buffer without end.
const MAX_BLOCK: usize = 1 << 20;
/// The largest HPACK dynamic table a client may ask for. h2 announces none, so
/// clients keep the default of 4096 bytes; the slack costs nothing.
const MAX_TABLE: usize = 64 << 10;
/// What replaces an authority h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("CSI connection: {0}")]
    Io(#[from] io::Error),
    #[error("CSI connection: malformed HTTP/2 from the client: {0}")]
    Framing(&'static str),
    #[error("CSI connection: the client's header block does not decode: {0}")]
    Hpack(#[source] DecoderError),
}

/// Relays the client's side of a connection, `from`, to h2, `to`, until the
/// client's end of stream (then `to` is shut down) or an error. The server's
/// side is copied back by the caller as it is.
pub async fn relay<R, W>(mut from: R, mut to: W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    let n = read_full(&mut from, &mut preface).await?;
    to.write_all(&preface[..n]).await?;
    if preface != *PREFACE {
        tokio::io::copy(&mut from, &mut to).await?;
        to.shutdown().await?;
        return Ok(());
    }
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(MAX_TABLE);
    let mut replaced = false;
    while let Some(frame) = read_head(&mut from).await? {
        if frame.kind != HEADERS {
            to.write_all(&frame.raw).await?;
            let copied = tokio::io::copy(&mut (&mut from).take(frame.len as u64), &mut to).await?;
            if copied < frame.len as u64 {
                return Err(RelayError::Framing("the connection ended inside a frame"));
            }
            continue;
        }
        let (block, priority) = header_block(&mut from, &frame).await?;
        let mut fields = Vec::new();
        let mut decoded = 0usize;
        decoder
            .decode_with_cb(&block, |name, value| {
                decoded += name.len() + value.len();
                if decoded <= MAX_BLOCK {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(RelayError::Hpack)?;
        if decoded > MAX_BLOCK {
            return Err(RelayError::Framing("a header list above 1 MiB"));
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                if !replaced {
                    tracing::debug!(authority = %String::from_utf8_lossy(value), "CSI socket: :authority read as localhost");
                    replaced = true;
                }
                *value = LOCALHOST.to_vec();
            }
        }
        write_block(&mut to, &frame, priority, &literals(&fields)).await?;
    }
    to.shutdown().await?;
    Ok(())
}

/// A frame's 9-byte header.
struct Head {
    raw: [u8; 9],
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// The next frame header, or None at the client's end of stream between frames.
async fn read_head<R: AsyncRead + Unpin>(from: &mut R) -> Result<Option<Head>, RelayError> {
    let mut raw = [0u8; 9];
    match read_full(from, &mut raw).await? {
        0 => return Ok(None),
        9 => {}
        _ => return Err(RelayError::Framing("the connection ended inside a frame header")),
    }
    Ok(Some(Head {
        raw,
        len: u32::from_be_bytes([0, raw[0], raw[1], raw[2]]) as usize,
        kind: raw[3],
        flags: raw[4],
        stream: u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff,
    }))
}

/// The whole header block a HEADERS frame starts (its CONTINUATION frames
/// appended, padding dropped), and the frame's priority fields if it has them.
async fn header_block<R: AsyncRead + Unpin>(
    from: &mut R,
    first: &Head,
) -> Result<(Vec<u8>, Option<[u8; 5]>), RelayError> {
    let payload = read_payload(from, first.len).await?;
    let mut body = payload.as_slice();
    let mut pad = 0;
    if first.flags & PADDED != 0 {
        let (&p, rest) =
            body.split_first().ok_or(RelayError::Framing("a padded HEADERS frame without its pad length"))?;
        (pad, body) = (usize::from(p), rest);
    }
    let mut priority = None;
    if first.flags & PRIORITY != 0 {
        let (p, rest) =
            body.split_first_chunk::<5>().ok_or(RelayError::Framing("HEADERS too short for its priority"))?;
        (priority, body) = (Some(*p), rest);
    }
    let fragment = body.len().checked_sub(pad).ok_or(RelayError::Framing("HEADERS padding longer than the frame"))?;
    let mut block = body[..fragment].to_vec();
    let mut end = first.flags & END_HEADERS != 0;
    while !end {
        let next = read_head(from).await?.ok_or(RelayError::Framing("the connection ended inside a header block"))?;
        if next.kind != CONTINUATION || next.stream != first.stream {
            return Err(RelayError::Framing("a header block interrupted by another frame"));
        }
        if block.len() + next.len > MAX_BLOCK {
            return Err(RelayError::Framing("a header block above 1 MiB"));
        }
        block.extend_from_slice(&read_payload(from, next.len).await?);
        end = next.flags & END_HEADERS != 0;
    }
    Ok((block, priority))
}

async fn read_payload<R: AsyncRead + Unpin>(from: &mut R, len: usize) -> Result<Vec<u8>, RelayError> {
    if len > MAX_BLOCK {
        return Err(RelayError::Framing("a header frame above 1 MiB"));
    }
    let mut payload = vec![0; len];
    from.read_exact(&mut payload).await?;
    Ok(payload)
}

/// `fields` as an HPACK block of literals without indexing (new names, no
/// Huffman): h2's dynamic table stays empty.
fn literals(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        for s in [name, value] {
            // Writing into a Vec cannot fail.
            let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut out);
            out.extend_from_slice(s);
        }
    }
    out
}

/// A HEADERS frame with `first`'s stream and flags (END_STREAM kept, no padding)
/// carrying `block`, and CONTINUATION frames for what does not fit.
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    first: &Head,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> Result<(), RelayError> {
    let room = MAX_FRAME - priority.map_or(0, |p| p.len());
    let (head, mut rest) = block.split_at(block.len().min(room));
    let mut flags = first.flags & !(PADDED | END_HEADERS);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let mut payload = priority.map_or_else(Vec::new, |p| p.to_vec());
    payload.extend_from_slice(head);
    write_frame(to, HEADERS, flags, first.stream, &payload).await?;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(to, CONTINUATION, flags, first.stream, chunk).await?;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> Result<(), RelayError> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    to.write_all(&frame).await?;
    Ok(())
}

/// Reads until `buf` is full or the stream ends; the bytes read.
async fn read_full<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
