//! Framing: the fixed 8-byte header and the incremental stream decoder.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +---------------+---------------+-------------------------------+
//! |  version (1)  |   msg_type    |          flags (= 0)          |
//! +---------------+---------------+-------------------------------+
//! |                     body_len (big-endian)                     |
//! +---------------------------------------------------------------+
//! |                 body: body_len bytes of CBOR ...              |
//! ```
//!
//! Reserved flags are **rejected**: version 1 defines no flag, a sender sets `flags = 0`, and a
//! receiver that sees any bit set fails with [`FrameError::ReservedFlags`]. A flag that changes
//! how a frame is read cannot be ignored safely, so new flags come with a new version.

use zerocopy::byteorder::{BigEndian, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The only protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// Largest body on the device↔gateway and attach conversations.
pub const MAX_BODY_SMALL: usize = 16 * 1024;
/// Largest body on the gateway↔CN conversation (batches of sealed credentials).
pub const MAX_BODY_CN: usize = 4 * 1024 * 1024;

/// The fixed frame header, read and written in place with `zerocopy`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Protocol version, [`VERSION`].
    pub version: u8,
    /// Message type code ([`MsgType`]).
    pub msg_type: u8,
    /// Reserved flags, zero in version 1.
    pub flags: U16<BigEndian>,
    /// Length of the body that follows, in bytes.
    pub body_len: U32<BigEndian>,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);

impl Header {
    /// A version-1 header with no flags.
    pub fn new(msg_type: MsgType, body_len: u32) -> Self {
        Header {
            version: VERSION,
            msg_type: msg_type as u8,
            flags: U16::new(0),
            body_len: U32::new(body_len),
        }
    }

    /// Checks the header against what `conv` accepts and returns the type and body length.
    pub fn validate(&self, conv: Conversation) -> Result<(MsgType, usize), FrameError> {
        if self.version != VERSION {
            return Err(FrameError::UnsupportedVersion(self.version));
        }
        let flags = self.flags.get();
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let msg_type = MsgType::from_u8(self.msg_type)
            .filter(|t| t.conversation().is_none_or(|c| c == conv))
            .ok_or(FrameError::UnknownType(self.msg_type))?;
        let len = usize::try_from(self.body_len.get()).unwrap_or(usize::MAX);
        let max = conv.max_body_len();
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok((msg_type, len))
    }
}

/// The three conversations; each has its own ALPN, message types and size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conversation {
    /// Device ↔ gateway, ALPN `companion-device/2`.
    Device,
    /// Gateway ↔ core network, ALPN `companion-cn/2`.
    Cn,
    /// Device ↔ core network attach, ALPN `companion-attach/1`.
    Attach,
}

impl Conversation {
    /// The TLS ALPN protocol identifier.
    pub const fn alpn(self) -> &'static str {
        match self {
            Conversation::Device => "companion-device/2",
            Conversation::Cn => "companion-cn/2",
            Conversation::Attach => "companion-attach/1",
        }
    }

    /// Largest accepted body length.
    pub const fn max_body_len(self) -> usize {
        match self {
            Conversation::Device | Conversation::Attach => MAX_BODY_SMALL,
            Conversation::Cn => MAX_BODY_CN,
        }
    }
}

macro_rules! msg_types {
    ($($(#[$m:meta])* $name:ident = $code:literal => $conv:expr,)*) => {
        /// Message type codes (the header's `msg_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum MsgType {
            $($(#[$m])* $name = $code,)*
        }

        impl MsgType {
            /// Every defined type.
            pub const ALL: &[MsgType] = &[$(MsgType::$name,)*];

            /// The type with this code, if defined.
            pub const fn from_u8(code: u8) -> Option<MsgType> {
                match code {
                    $($code => Some(MsgType::$name),)*
                    _ => None,
                }
            }

            /// The conversation this type belongs to; `None` for `Error`, which all share.
            pub const fn conversation(self) -> Option<Conversation> {
                match self {
                    $(MsgType::$name => $conv,)*
                }
            }
        }
    };
}

msg_types! {
    /// Device → gateway: ask for a first credential.
    ProvisionRequest = 0x01 => Some(Conversation::Device),
    /// Device → gateway: ask for a fresh credential replacing one it holds.
    RenewRequest = 0x02 => Some(Conversation::Device),
    /// Gateway → device: the sealed credential.
    CredentialDelivery = 0x03 => Some(Conversation::Device),
    /// Device → gateway: the credential was opened and stored.
    DeliveryAck = 0x04 => Some(Conversation::Device),
    /// Gateway → device: the gateway forgot the sealed blob; exchange done.
    AckConfirmed = 0x05 => Some(Conversation::Device),
    /// Gateway → device: request queued, keep waiting.
    Pending = 0x06 => Some(Conversation::Device),
    /// Gateway → CN: start AKA with the companion's SUPI.
    AuthStart = 0x10 => Some(Conversation::Cn),
    /// CN → gateway: RAND and AUTN.
    AuthChallenge = 0x11 => Some(Conversation::Cn),
    /// Gateway → CN: RES* and the session binding.
    AuthResponse = 0x12 => Some(Conversation::Cn),
    /// Gateway → CN: AUTS after a synchronisation failure.
    AuthResync = 0x13 => Some(Conversation::Cn),
    /// CN → gateway: authenticated; the subscription's policy summary.
    AuthResult = 0x14 => Some(Conversation::Cn),
    /// Gateway → CN: a batch of provision/renew items.
    BatchProvision = 0x20 => Some(Conversation::Cn),
    /// CN → gateway: one outcome per batch item.
    BatchResult = 0x21 => Some(Conversation::Cn),
    /// Gateway → CN: revoke a child credential.
    Revoke = 0x22 => Some(Conversation::Cn),
    /// CN → gateway: what was revoked.
    RevokeResult = 0x23 => Some(Conversation::Cn),
    /// Gateway → CN: list the child credentials.
    ListChildren = 0x24 => Some(Conversation::Cn),
    /// CN → gateway: the child credentials.
    ChildList = 0x25 => Some(Conversation::Cn),
    /// Device → CN: attach with a provisioned SUPI.
    AttachRequest = 0x30 => Some(Conversation::Attach),
    /// CN → device: RAND and AUTN.
    AttachChallenge = 0x31 => Some(Conversation::Attach),
    /// Device → CN: RES* and the session binding.
    AttachResponse = 0x32 => Some(Conversation::Attach),
    /// Device → CN: AUTS after a synchronisation failure.
    AttachResync = 0x33 => Some(Conversation::Attach),
    /// CN → device: attached; expiry and restrictions.
    AttachAccept = 0x34 => Some(Conversation::Attach),
    /// Any direction, any conversation: the exchange failed.
    Error = 0x7F => None,
}

/// A frame-level error. Each maps to an [`ErrorCode`](crate::msg::ErrorCode) sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header's version is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The message type is not defined for this conversation.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// A reserved flag bit is set.
    #[error("reserved flags set: 0x{0:04x}")]
    ReservedFlags(u16),
    /// The announced body is larger than the conversation allows.
    #[error("frame body of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The conversation's maximum.
        max: usize,
    },
    /// The input (or the stream) ended inside a frame.
    #[error("truncated frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// Bytes follow the frame where none are allowed.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
}

/// A complete frame whose header has been validated; the body is still undecoded CBOR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type.
    pub msg_type: MsgType,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Writes a header and `body` into one buffer.
///
/// Fails with [`FrameError::TooLarge`] if `body` is over `conv`'s limit.
pub fn encode_frame(
    conv: Conversation,
    msg_type: MsgType,
    body: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let max = conv.max_body_len();
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or(FrameError::TooLarge {
            len: body.len(),
            max,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(Header::new(msg_type, len).as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads and validates a header from the start of `bytes`.
pub fn parse_header(conv: Conversation, bytes: &[u8]) -> Result<(MsgType, usize), FrameError> {
    let (header, _) = Header::ref_from_prefix(bytes).map_err(|_| FrameError::Truncated {
        have: bytes.len(),
        need: HEADER_LEN,
    })?;
    header.validate(conv)
}

/// Decodes exactly one frame from `bytes` (a datagram, or a whole stream): nothing may follow it.
pub fn decode_frame(conv: Conversation, bytes: &[u8]) -> Result<Frame, FrameError> {
    let (msg_type, len) = parse_header(conv, bytes)?;
    let need = HEADER_LEN + len;
    match bytes.len() {
        n if n < need => Err(FrameError::Truncated { have: n, need }),
        n if n > need => Err(FrameError::TrailingBytes(n - need)),
        _ => Ok(Frame {
            msg_type,
            body: bytes[HEADER_LEN..].to_vec(),
        }),
    }
}

/// Incremental decoder for stream transports: push bytes as they arrive, pop complete frames.
///
/// The header is validated as soon as its 8 bytes are present, so an oversized frame is
/// rejected before any of its body is buffered. After an error the decoder stays failed.
#[derive(Debug)]
pub struct FrameDecoder {
    conv: Conversation,
    buf: Vec<u8>,
    /// Start of unconsumed data in `buf`.
    pos: usize,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder for one stream of `conv`.
    pub fn new(conv: Conversation) -> Self {
        FrameDecoder {
            conv,
            buf: Vec::new(),
            pos: 0,
            failed: None,
        }
    }

    /// The conversation this decoder checks against.
    pub fn conversation(&self) -> Conversation {
        self.conv
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let (msg_type, len) = match parse_header(self.conv, avail) {
            Ok(v) => v,
            Err(e) => return Err(self.fail(e)),
        };
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.pos += HEADER_LEN + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > self.conv.max_body_len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(Frame { msg_type, body }))
    }

    /// Call at end of stream: fails with [`FrameError::Truncated`] if a partial frame remains.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.pos..];
        if avail.is_empty() {
            return Ok(());
        }
        let need = match parse_header(self.conv, avail) {
            Ok((_, len)) => HEADER_LEN + len,
            Err(FrameError::Truncated { .. }) => HEADER_LEN,
            Err(e) => return Err(self.fail(e)),
        };
        let e = FrameError::Truncated {
            have: avail.len(),
            need,
        };
        Err(self.fail(e))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.buf = Vec::new();
        self.pos = 0;
        self.failed = Some(e.clone());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_golden() {
        let h = Header::new(MsgType::ProvisionRequest, 0x0102);
        assert_eq!(
            h.as_bytes(),
            &[0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02]
        );
        let f = encode_frame(Conversation::Device, MsgType::Error, &[0xa0]).unwrap();
        assert_eq!(f, [1, 0x7f, 0, 0, 0, 0, 0, 1, 0xa0]);
    }

    #[test]
    fn header_errors() {
        let c = Conversation::Device;
        assert_eq!(
            parse_header(c, &[2, 1, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnsupportedVersion(2))
        );
        assert_eq!(
            parse_header(c, &[1, 0x99, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownType(0x99))
        );
        // A CN type on the device conversation is unknown there.
        assert_eq!(
            parse_header(c, &[1, 0x20, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownType(0x20))
        );
        assert_eq!(
            parse_header(c, &[1, 1, 0x80, 0, 0, 0, 0, 0]),
            Err(FrameError::ReservedFlags(0x8000))
        );
        assert_eq!(
            parse_header(c, &[1, 1, 0, 0, 0, 0, 0x40, 1]),
            Err(FrameError::TooLarge {
                len: 16385,
                max: MAX_BODY_SMALL
            })
        );
        assert!(parse_header(Conversation::Cn, &[1, 0x21, 0, 0, 0, 0x40, 0, 0]).is_ok());
        assert_eq!(
            parse_header(c, &[1, 1, 0]),
            Err(FrameError::Truncated { have: 3, need: 8 })
        );
        assert_eq!(
            decode_frame(c, &[1, 1, 0, 0, 0, 0, 0, 1, 0xa0, 0]),
            Err(FrameError::TrailingBytes(1))
        );
        assert_eq!(
            decode_frame(c, &[1, 1, 0, 0, 0, 0, 0, 2, 0xa0]),
            Err(FrameError::Truncated { have: 9, need: 10 })
        );
    }

    #[test]
    fn decoder_byte_by_byte() {
        let mut wire =
            encode_frame(Conversation::Device, MsgType::ProvisionRequest, b"abc").unwrap();
        wire.extend(encode_frame(Conversation::Device, MsgType::DeliveryAck, b"").unwrap());
        let mut d = FrameDecoder::new(Conversation::Device);
        let mut got = Vec::new();
        for b in &wire {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].body, b"abc");
        assert_eq!(got[1].msg_type, MsgType::DeliveryAck);
    }

    #[test]
    fn decoder_oversize_before_body_and_truncation() {
        let mut d = FrameDecoder::new(Conversation::Attach);
        d.push(&[1, 0x30, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        assert_eq!(d.buffered(), 0);
        assert!(d.next_frame().is_err());

        let mut d = FrameDecoder::new(Conversation::Attach);
        d.push(&[1, 0x30, 0, 0, 0, 0, 0, 4, 1, 2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(
            d.finish(),
            Err(FrameError::Truncated { have: 10, need: 12 })
        );
        let mut d = FrameDecoder::new(Conversation::Attach);
        d.push(&[1, 0x30]);
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 2, need: 8 }));
    }
}
