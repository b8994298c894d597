//! The NBD protocol's wire format (newstyle fixed handshake and the simple
//! reply transmission phase), following the upstream protocol document
//! field by field. No I/O here: the server in `run::nbd` reads and writes
//! the bytes; this module says what they mean and whether a request is
//! acceptable.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;

// Info types inside REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors, as the protocol numbers them (Linux values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest payload we accept in one request; advertised as the maximum
/// block size. Larger writes are drained and refused.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Preferred and minimum block sizes we advertise.
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MIN_BLOCK: u32 = 1;

/// Flags the volume offers: everything it implements. A flush on one
/// connection covers every write completed on any connection (the flush is
/// device-wide), so several connections are safe.
pub const VOLUME_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

pub const REQUEST_LEN: usize = 28;

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header from the client: IHAVEOPT, option, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, String> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8"));
    if magic != IHAVEOPT {
        return Err(format!("option magic {magic:#x} is not IHAVEOPT"));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().expect("4")),
        length: u32::from_be_bytes(b[12..16].try_into().expect("4")),
    })
}

pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_REP_INFO carrying NBD_INFO_EXPORT.
pub fn info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    option_reply(option, REP_INFO, &d)
}

/// NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(option: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
    option_reply(option, REP_INFO, &d)
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO: export name and requested infos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_go(data: &[u8]) -> Result<GoRequest, String> {
    let too_short = || format!("NBD_OPT_GO/INFO body of {} bytes is truncated", data.len());
    let name_len =
        u32::from_be_bytes(data.get(0..4).ok_or_else(too_short)?.try_into().expect("4")) as usize;
    let name = data.get(4..4 + name_len).ok_or_else(too_short)?;
    let rest = &data[4 + name_len..];
    let n =
        u16::from_be_bytes(rest.get(0..2).ok_or_else(too_short)?.try_into().expect("2")) as usize;
    let infos = rest.get(2..2 + 2 * n).ok_or_else(too_short)?;
    if rest.len() != 2 + 2 * n {
        return Err(format!(
            "NBD_OPT_GO/INFO body has {} trailing bytes",
            rest.len() - 2 - 2 * n
        ));
    }
    Ok(GoRequest {
        name: String::from_utf8_lossy(name).into_owned(),
        infos: infos
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    })
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != REQUEST_MAGIC {
        // Without the magic we cannot know where the next request starts:
        // the only safe answer is to drop the connection.
        return Err(format!(
            "request magic {magic:#010x} is wrong; the stream is out of step"
        ));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2")),
        command: u16::from_be_bytes(b[6..8].try_into().expect("2")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4")),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        punch: bool,
    },
    Disconnect,
}

/// A refused request: the errno to answer and how many payload bytes must
/// be read and thrown away so the stream stays in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub drain: u64,
    pub reason: &'static str,
}

/// Validates a request against the export: bounds, size, known command.
pub fn validate(r: &Request, size: u64, writable: bool) -> Result<Command, Refusal> {
    let payload = if r.command == CMD_WRITE {
        r.length as u64
    } else {
        0
    };
    let refuse = |errno, reason| Refusal {
        errno,
        drain: payload,
        reason,
    };
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let in_bounds = r
        .offset
        .checked_add(r.length as u64)
        .is_some_and(|end| end <= size);
    match r.command {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
            if r.length > MAX_REQUEST && matches!(r.command, CMD_READ | CMD_WRITE) {
                return Err(refuse(EINVAL, "request larger than the advertised maximum"));
            }
            if !in_bounds {
                let errno = if r.command == CMD_READ {
                    EINVAL
                } else {
                    ENOSPC
                };
                return Err(refuse(errno, "request past the end of the volume"));
            }
            if r.command != CMD_READ && !writable {
                return Err(refuse(EPERM, "volume is not primary here"));
            }
            Ok(match r.command {
                CMD_READ => Command::Read {
                    offset: r.offset,
                    length: r.length,
                },
                CMD_WRITE => Command::Write {
                    offset: r.offset,
                    length: r.length,
                    fua,
                },
                CMD_TRIM => Command::Trim {
                    offset: r.offset,
                    length: r.length,
                    fua,
                },
                _ => Command::WriteZeroes {
                    offset: r.offset,
                    length: r.length,
                    fua,
                    punch: r.flags & CMD_FLAG_NO_HOLE == 0,
                },
            })
        }
        CMD_FLUSH => {
            if !writable {
                return Err(refuse(EPERM, "volume is not primary here"));
            }
            Ok(Command::Flush)
        }
        CMD_DISC => Ok(Command::Disconnect),
        _ => Err(refuse(EINVAL, "unknown command")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: u16, offset: u64, length: u32) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 9,
            offset,
            length,
        }
    }

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        let mut b = encode_request(&r);
        b[0] ^= 0xff;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn validation() {
        let size = 1 << 20;
        assert_eq!(
            validate(&req(CMD_READ, 0, 4096), size, true),
            Ok(Command::Read {
                offset: 0,
                length: 4096
            })
        );
        let past = validate(&req(CMD_WRITE, size - 10, 4096), size, true).unwrap_err();
        assert_eq!((past.errno, past.drain), (ENOSPC, 4096));
        let wrap = validate(&req(CMD_READ, u64::MAX - 1, 4096), size, true).unwrap_err();
        assert_eq!((wrap.errno, wrap.drain), (EINVAL, 0));
        let big = validate(&req(CMD_WRITE, 0, MAX_REQUEST + 1), u64::MAX, true).unwrap_err();
        assert_eq!(big.drain, MAX_REQUEST as u64 + 1);
        let unknown = validate(&req(42, 0, 0), size, true).unwrap_err();
        assert_eq!(unknown.errno, EINVAL);
        let ro = validate(&req(CMD_WRITE, 0, 512), size, false).unwrap_err();
        assert_eq!((ro.errno, ro.drain), (EPERM, 512));
        assert!(matches!(
            validate(
                &Request {
                    flags: CMD_FLAG_NO_HOLE,
                    ..req(CMD_WRITE_ZEROES, 0, 8192)
                },
                size,
                true
            ),
            Ok(Command::WriteZeroes { punch: false, .. })
        ));
    }

    #[test]
    fn go_body() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&d).unwrap(),
            GoRequest {
                name: "vol".into(),
                infos: vec![3]
            }
        );
        assert!(parse_go(&d[..5]).is_err());
        assert!(parse_go(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
