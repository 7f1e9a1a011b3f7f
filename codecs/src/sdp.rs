//! The SDP offer/answer subset of a G.711 B2BUA (RFC 4566, RFC 3264).
//!
//! Parsing goes through `webrtc-sdp`; what we need from it is condensed into
//! [`MediaDescription`]. Offers and answers we send are written by [`write`]: a handful of
//! lines whose exact form we control.

use std::net::IpAddr;

use webrtc_sdp::SdpSession;
use webrtc_sdp::address::ExplicitlyTypedAddress;
use webrtc_sdp::attribute_type::SdpAttribute;
use webrtc_sdp::media_type::{SdpFormatList, SdpMediaValue};

use crate::CodecError;
use crate::g711::{PT_PCMA, PT_PCMU};

/// Media kind of an m-line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `m=audio`.
    Audio,
    /// `m=video`.
    Video,
}

/// One payload format offered on an m-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    /// RTP payload type.
    pub pt: u8,
    /// Encoding name, upper case (`PCMU`, `PCMA`, `TELEPHONE-EVENT`, ...).
    pub name: String,
    /// Clock rate in Hz.
    pub clock: u32,
}

/// What a B2BUA needs of one m-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// Audio or video.
    pub kind: MediaKind,
    /// Where the peer wants to receive (media-level `c=` or else session-level).
    pub addr: IpAddr,
    /// The peer's RTP port (0 means the stream is rejected/disabled).
    pub port: u16,
    /// Offered formats in preference order.
    pub formats: Vec<Format>,
}

impl MediaDescription {
    /// The RFC 4733 telephone-event payload type at 8 kHz, if offered.
    pub fn telephone_event(&self) -> Option<u8> {
        self.formats
            .iter()
            .find(|f| f.name == "TELEPHONE-EVENT" && f.clock == 8000)
            .map(|f| f.pt)
    }

    /// The first G.711 format in the peer's order (RFC 3264: the offerer's preference).
    pub fn first_g711(&self) -> Option<u8> {
        self.formats
            .iter()
            .find(|f| f.pt == PT_PCMU || f.pt == PT_PCMA)
            .map(|f| f.pt)
    }

    /// The G.711 payload types offered, in the offerer's order.
    pub fn g711_formats(&self) -> Vec<u8> {
        self.formats
            .iter()
            .filter(|f| f.pt == PT_PCMU || f.pt == PT_PCMA)
            .map(|f| f.pt)
            .collect()
    }
}

/// Parses an SDP body and returns its first audio m-line.
pub fn parse_audio(body: &str) -> Result<MediaDescription, CodecError> {
    let session = webrtc_sdp::parse_sdp(body, false).map_err(|e| CodecError::Sdp(e.to_string()))?;
    parse_media(&session)
        .into_iter()
        .find(|m| m.kind == MediaKind::Audio)
        .ok_or_else(|| CodecError::Sdp("no audio m-line with an IP connection address".into()))
}

/// Parses an SDP body: its first audio m-line, and its first video m-line if one is offered
/// with a non-zero port.
pub fn parse_offer(body: &str) -> Result<(MediaDescription, Option<MediaDescription>), CodecError> {
    let session = webrtc_sdp::parse_sdp(body, false).map_err(|e| CodecError::Sdp(e.to_string()))?;
    let media = parse_media(&session);
    let audio = media
        .iter()
        .find(|m| m.kind == MediaKind::Audio)
        .cloned()
        .ok_or_else(|| CodecError::Sdp("no audio m-line with an IP connection address".into()))?;
    let video = media
        .into_iter()
        .find(|m| m.kind == MediaKind::Video && m.port != 0 && !m.formats.is_empty());
    Ok((audio, video))
}

/// Media direction of an offer or answer (RFC 3264 §5.1, §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `a=sendrecv` (the default).
    SendRecv,
    /// `a=sendonly`: the offerer puts the other side on hold.
    SendOnly,
    /// `a=recvonly`.
    RecvOnly,
    /// `a=inactive`.
    Inactive,
}

impl Direction {
    /// The direction an answer takes to an offer in this direction.
    pub fn answer(self) -> Self {
        match self {
            Self::SendOnly => Self::RecvOnly,
            Self::RecvOnly => Self::SendOnly,
            d => d,
        }
    }

    fn attribute(self) -> &'static str {
        match self {
            Self::SendRecv => "a=sendrecv",
            Self::SendOnly => "a=sendonly",
            Self::RecvOnly => "a=recvonly",
            Self::Inactive => "a=inactive",
        }
    }
}

/// The direction of an offer's first audio stream: its media-level attribute, else the
/// session-level one, else `sendrecv`. A connection address of `0.0.0.0` (RFC 2543 hold)
/// counts as `sendonly` when nothing else is said.
pub fn direction(body: &str) -> Result<Direction, CodecError> {
    let session = webrtc_sdp::parse_sdp(body, false).map_err(|e| CodecError::Sdp(e.to_string()))?;
    let of = |attrs: &[SdpAttribute]| {
        attrs.iter().find_map(|a| match a {
            SdpAttribute::Sendrecv => Some(Direction::SendRecv),
            SdpAttribute::Sendonly => Some(Direction::SendOnly),
            SdpAttribute::Recvonly => Some(Direction::RecvOnly),
            SdpAttribute::Inactive => Some(Direction::Inactive),
            _ => None,
        })
    };
    let audio = session
        .media
        .iter()
        .find(|m| matches!(m.get_type(), SdpMediaValue::Audio));
    let stated = audio
        .and_then(|m| of(m.get_attributes()))
        .or_else(|| of(&session.attribute));
    if let Some(d) = stated {
        return Ok(d);
    }
    let held = parse_media(&session)
        .iter()
        .find(|m| m.kind == MediaKind::Audio)
        .is_some_and(|m| m.addr.is_unspecified());
    Ok(if held {
        Direction::SendOnly
    } else {
        Direction::SendRecv
    })
}

/// Our description `local` (written by [`write`]) with its direction set to `dir` and its
/// `o=` version set to `version`: the answer to a re-offer within the dialog.
pub fn redescribe(local: &str, dir: Direction, version: u64) -> String {
    let mut out = String::with_capacity(local.len());
    for line in local.split("\r\n").filter(|l| !l.is_empty()) {
        if let Some(o) = line.strip_prefix("o=") {
            let mut f: Vec<&str> = o.split(' ').collect();
            let v = version.to_string();
            if f.len() == 6 {
                f[2] = &v;
                out.push_str("o=");
                out.push_str(&f.join(" "));
            } else {
                out.push_str(line);
            }
        } else if matches!(
            line,
            "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive"
        ) {
            out.push_str(dir.attribute());
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// The `o=` version of a description, if well-formed.
pub fn version(body: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix("o="))
        .and_then(|o| o.split(' ').nth(2))
        .and_then(|v| v.trim().parse().ok())
}

/// The video stream of an answer: our relay port and the formats we accept (a subset of the
/// offer's), or `None` to refuse the offered video stream (port 0, RFC 3264 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoAnswer {
    /// Relay port, or 0 to refuse.
    pub port: u16,
    /// Formats (payload types with their rtpmap).
    pub formats: Vec<Format>,
}

/// Appends a video m-line (and its rtpmaps) to an SDP body written by [`write`].
pub fn append_video(sdp: &mut String, video: &VideoAnswer) {
    let pts: Vec<String> = video.formats.iter().map(|f| f.pt.to_string()).collect();
    // A refused stream still lists a format, as the m-line grammar requires one.
    let pts = if pts.is_empty() {
        "0".to_owned()
    } else {
        pts.join(" ")
    };
    sdp.push_str(&format!("m=video {} RTP/AVP {pts}\r\n", video.port));
    for f in &video.formats {
        sdp.push_str(&format!("a=rtpmap:{} {}/{}\r\n", f.pt, f.name, f.clock));
    }
    sdp.push_str(if video.port == 0 {
        "a=inactive\r\n"
    } else {
        "a=sendrecv\r\n"
    });
}

fn parse_media(session: &SdpSession) -> Vec<MediaDescription> {
    let session_addr = session.connection.as_ref().and_then(|c| ip_of(&c.address));
    session
        .media
        .iter()
        .filter_map(|m| {
            let kind = match m.get_type() {
                SdpMediaValue::Audio => MediaKind::Audio,
                SdpMediaValue::Video => MediaKind::Video,
                _ => return None,
            };
            let addr = m
                .get_connection()
                .as_ref()
                .and_then(|c| ip_of(&c.address))
                .or(session_addr)?;
            let port = u16::try_from(m.get_port()).ok()?;
            let pts: Vec<u8> = match m.get_formats() {
                SdpFormatList::Integers(v) => {
                    v.iter().filter_map(|p| u8::try_from(*p).ok()).collect()
                }
                _ => Vec::new(),
            };
            let formats = pts
                .into_iter()
                .map(|pt| {
                    let rtpmap = m.get_attributes().iter().find_map(|a| match a {
                        SdpAttribute::Rtpmap(r) if r.payload_type == pt => Some(r),
                        _ => None,
                    });
                    match rtpmap {
                        Some(r) => Format {
                            pt,
                            name: r.codec_name.to_ascii_uppercase(),
                            clock: r.frequency,
                        },
                        None => static_format(pt),
                    }
                })
                .collect();
            Some(MediaDescription {
                kind,
                addr,
                port,
                formats,
            })
        })
        .collect()
}

fn ip_of(a: &ExplicitlyTypedAddress) -> Option<IpAddr> {
    match a {
        ExplicitlyTypedAddress::Ip(ip) => Some(*ip),
        ExplicitlyTypedAddress::Fqdn { .. } => None,
    }
}

/// RFC 3551 static payload types (those a peer may use without `a=rtpmap`).
fn static_format(pt: u8) -> Format {
    let (name, clock) = match pt {
        0 => ("PCMU", 8000),
        3 => ("GSM", 8000),
        8 => ("PCMA", 8000),
        9 => ("G722", 8000),
        18 => ("G729", 8000),
        _ => ("UNKNOWN", 0),
    };
    Format {
        pt,
        name: name.into(),
        clock,
    }
}

/// Encoding name of a payload type we can send.
pub fn encoding_name(pt: u8) -> &'static str {
    match pt {
        PT_PCMA => "PCMA",
        _ => "PCMU",
    }
}

/// Writes an audio SDP body with the given payload types (and telephone-event if given).
///
/// `session_id` goes into `o=`; the version is fixed at the session id because Parley does
/// not re-offer within a dialog yet.
pub fn write(
    addr: IpAddr,
    port: u16,
    pts: &[u8],
    telephone_event: Option<u8>,
    session_id: u64,
) -> String {
    let ip_ver = if addr.is_ipv4() { "IP4" } else { "IP6" };
    let mut fmts: Vec<String> = pts.iter().map(u8::to_string).collect();
    if let Some(te) = telephone_event {
        fmts.push(te.to_string());
    }
    let mut s = format!(
        "v=0\r\no=parley {session_id} {session_id} IN {ip_ver} {addr}\r\ns=parley\r\nc=IN {ip_ver} {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP {}\r\n",
        fmts.join(" ")
    );
    for pt in pts {
        s.push_str(&format!("a=rtpmap:{pt} {}/8000\r\n", encoding_name(*pt)));
    }
    if let Some(te) = telephone_event {
        s.push_str(&format!(
            "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"
        ));
    }
    s.push_str("a=ptime:20\r\na=sendrecv\r\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIPP_OFFER: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

    #[test]
    fn re_offer_directions_and_our_answer() {
        let hold = SIPP_OFFER.to_owned() + "a=sendonly\r\n";
        assert_eq!(direction(&hold).unwrap(), Direction::SendOnly);
        assert_eq!(direction(SIPP_OFFER).unwrap(), Direction::SendRecv);
        let old_hold = SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0");
        assert_eq!(direction(&old_hold).unwrap(), Direction::SendOnly);
        let inactive = SIPP_OFFER.replace("s=-\r\n", "s=-\r\na=inactive\r\n");
        assert_eq!(direction(&inactive).unwrap(), Direction::Inactive);

        let ours = write("10.0.0.1".parse().unwrap(), 4000, &[0], Some(101), 77);
        assert_eq!(version(&ours), Some(77));
        let held = redescribe(&ours, Direction::SendOnly.answer(), 78);
        assert!(
            held.contains("o=parley 77 78 IN IP4 10.0.0.1\r\n"),
            "{held}"
        );
        assert!(held.contains("a=recvonly\r\n") && !held.contains("a=sendrecv"));
        let m = parse_audio(&held).unwrap();
        assert_eq!((m.port, m.first_g711()), (4000, Some(0)));
        assert_eq!(redescribe(&ours, Direction::SendRecv, 77), ours);
    }

    #[test]
    fn parses_sipp_offer() {
        let m = parse_audio(SIPP_OFFER).unwrap();
        assert_eq!(m.addr.to_string(), "127.0.0.1");
        assert_eq!(m.port, 6000);
        assert_eq!(m.first_g711(), Some(0));
        assert_eq!(m.telephone_event(), None);
    }

    #[test]
    fn static_types_and_media_level_connection() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8 0 101\r\nc=IN IP4 192.0.2.7\r\na=rtpmap:101 telephone-event/8000\r\n";
        let m = parse_audio(sdp).unwrap();
        assert_eq!(m.addr.to_string(), "192.0.2.7");
        assert_eq!(m.g711_formats(), vec![8, 0]);
        assert_eq!(m.telephone_event(), Some(101));
    }

    #[test]
    fn our_answer_parses_back() {
        let s = write("127.0.0.1".parse().unwrap(), 20000, &[8], Some(101), 7);
        let m = parse_audio(&s).unwrap();
        assert_eq!(
            (m.port, m.first_g711(), m.telephone_event()),
            (20000, Some(8), Some(101))
        );
    }

    #[test]
    fn audio_and_video_offer_and_answer() {
        let offer = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\nm=video 6002 RTP/AVP 96 97\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 H264/90000\r\n";
        let (a, v) = parse_offer(offer).unwrap();
        assert_eq!(a.port, 6000);
        let v = v.unwrap();
        assert_eq!(
            (v.port, v.formats[0].name.as_str(), v.formats[0].clock),
            (6002, "VP8", 90000)
        );
        let mut ans = write("127.0.0.1".parse().unwrap(), 20000, &[0], None, 1);
        append_video(
            &mut ans,
            &VideoAnswer {
                port: 20002,
                formats: v.formats[..1].to_vec(),
            },
        );
        let (a2, v2) = parse_offer(&ans).unwrap();
        assert_eq!((a2.port, v2.unwrap().port), (20000, 20002));
        // A refused video stream parses as "no video".
        let mut refused = write("127.0.0.1".parse().unwrap(), 20000, &[0], None, 1);
        append_video(
            &mut refused,
            &VideoAnswer {
                port: 0,
                formats: vec![],
            },
        );
        assert_eq!(parse_offer(&refused).unwrap().1, None);
        // Audio-only offers have no video.
        assert_eq!(parse_offer(SIPP_OFFER).unwrap().1, None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_audio("").is_err());
        assert!(parse_audio("hello").is_err());
        // Valid SDP, but video only.
        let v = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n";
        assert!(parse_audio(v).is_err());
    }
}
