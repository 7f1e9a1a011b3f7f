//! Small helpers over `sipx-sip` messages.

use bytes::Bytes;

use super::error::SipError;
use rand::Rng;
use sipx_sip::headers::{Address, CallId, Contact, From, To};
use sipx_sip::{
    CSeq, HeaderName, Method, Request, RequestBuilder, Response, ResponseBuilder, StatusCode, Uri,
};

/// A random token for tags and branches, drawn from `rng` (the core's seeded generator:
/// tags must be unguessable, since they authenticate in-dialog requests).
pub fn token(rng: &mut impl Rng, len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Header value as a string (lossy).
pub fn header_str(headers: &sipx_sip::Headers, name: &HeaderName) -> Option<String> {
    headers
        .value(name)
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// The Call-ID of a message.
pub fn call_id(headers: &sipx_sip::Headers) -> Option<String> {
    match headers.typed::<CallId>() {
        Some(Ok(c)) => Some(String::from_utf8_lossy(&c.0).into_owned()),
        _ => None,
    }
}

/// The CSeq of a message.
pub fn cseq(headers: &sipx_sip::Headers) -> Option<CSeq> {
    headers.typed::<CSeq>().and_then(Result::ok)
}

/// The To tag.
pub fn to_tag(headers: &sipx_sip::Headers) -> Option<String> {
    let to = headers.typed::<To>()?.ok()?;
    to.tag().map(|t| String::from_utf8_lossy(t).into_owned())
}

/// The From address.
pub fn from_addr(headers: &sipx_sip::Headers) -> Option<Address> {
    headers.typed::<From>().and_then(Result::ok).map(|f| f.0)
}

/// The first Contact URI.
pub fn contact_uri(headers: &sipx_sip::Headers) -> Option<sipx_sip::Uri> {
    headers
        .typed::<Contact>()
        .and_then(Result::ok)
        .map(|c| c.0.uri)
}

/// Builds a response to `req`, adding `to_tag` to To if it has none.
pub fn response(
    req: &Request,
    code: u16,
    to_tag: Option<&str>,
    contact: Option<&str>,
    sdp: Option<&str>,
) -> Option<Response> {
    let status = StatusCode::new(code)?;
    let mut b = ResponseBuilder::to_request(req, status, reason(code)).ok()?;
    if let Some(tag) = to_tag
        && code > 100
        && req
            .headers
            .typed::<To>()
            .and_then(Result::ok)
            .is_some_and(|t| t.tag().is_none())
    {
        let to = header_str(&req.headers, &HeaderName::To)?;
        b = b
            .set_header(&HeaderName::To, format!("{to};tag={tag}"))
            .ok()?;
    }
    if let Some(c) = contact {
        b = b.header(HeaderName::Contact, format!("<{c}>")).ok()?;
    }
    b = b.header(HeaderName::Server, "Parley/0.1").ok()?;
    if let Some(body) = sdp {
        b = b
            .header(HeaderName::ContentType, "application/sdp")
            .ok()?
            .body(Bytes::from(body.to_owned()));
    }
    Some(b.build())
}

/// Standard reason phrases.
pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        406 => "Not Acceptable",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "Version Not Supported",
        603 => "Decline",
        _ => "Unknown",
    }
}

#[allow(clippy::too_many_arguments)]
/// A request outside any transaction of ours (BYE, ACK, OPTIONS, INVITE toward the trunk).
pub fn build_request(
    method: Method,
    uri: Uri,
    via: &str,
    from: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
    contact: &str,
    route: &[String],
    sdp: Option<&str>,
) -> Option<Request> {
    let mut b = RequestBuilder::new(method.clone(), uri)
        .header(HeaderName::Via, via.to_owned())
        .ok()?
        .max_forwards(70)
        .header(HeaderName::From, from.to_owned())
        .ok()?
        .header(HeaderName::To, to.to_owned())
        .ok()?
        .header(HeaderName::CallId, call_id.to_owned())
        .ok()?
        .cseq(cseq, &method)
        .ok()?;
    for r in route {
        b = b.header(HeaderName::Route, r.clone()).ok()?;
    }
    if method != Method::Ack || sdp.is_some() {
        b = b.header(HeaderName::Contact, format!("<{contact}>")).ok()?;
    }
    b = b.header(HeaderName::UserAgent, "Parley/0.1").ok()?;
    if let Some(body) = sdp {
        b = b
            .header(HeaderName::ContentType, "application/sdp")
            .ok()?
            .body(Bytes::from(body.to_owned()));
    }
    Some(b.build())
}

/// The response to a request refused for `err`, with the headers the status calls for.
/// When the request's headers are too odd for the response builder (RFC 4475 `intmeth`,
/// `insuf`), the response is put together from the request's header values as they are,
/// so that every request that can be answered is.
pub fn error_response(req: &Request, err: &SipError, tag: &str) -> Bytes {
    let code = err.status();
    let built = response(req, code, Some(tag), None, None).and_then(|mut r| {
        for (name, value) in err.extra_headers() {
            let name = HeaderName::parse(&Bytes::from_static(name.as_bytes()));
            r.headers.push(sipx_sip::Header::build(name, value).ok()?);
        }
        Some(sipx_sip::Message::Response(r).to_bytes())
    });
    built.unwrap_or_else(|| {
        let lines = req
            .headers
            .iter()
            .map(|h| (h.name().to_string(), h.value().to_vec()));
        raw_response(lines, code, tag, &err.extra_headers())
    })
}

/// A response with no extra headers, from the request's header values as they are.
pub fn plain_response(req: &Request, code: u16, tag: &str) -> Bytes {
    let lines = req
        .headers
        .iter()
        .map(|h| (h.name().to_string(), h.value().to_vec()));
    raw_response(lines, code, tag, &[])
}

/// A 400 for a datagram that does not parse as SIP, if it looks like a request whose
/// headers still say where the answer goes (a Via); `None` for anything else (a
/// response, or junk). Header lines are read as raw `name: value` pairs.
pub fn unparseable_response(data: &[u8], tag: &str) -> Option<Bytes> {
    let text = data;
    let head_end = find(text, b"\r\n\r\n")
        .or_else(|| find(text, b"\n\n"))
        .unwrap_or(text.len());
    let head = &text[..head_end];
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = lines.next()?;
    if start.starts_with(b"SIP/") || !start.windows(4).any(|w| w.eq_ignore_ascii_case(b"sip/")) {
        return None;
    }
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            // A folded continuation of the previous header (RFC 3261 §7.3.1).
            if let Some((_, v)) = headers.last_mut() {
                v.push(b' ');
                v.extend_from_slice(trim(line));
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(trim(&line[..colon])).into_owned();
        headers.push((name, trim(&line[colon + 1..]).to_vec()));
    }
    let has_via = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("via") || n.eq_ignore_ascii_case("v"));
    has_via.then(|| raw_response(headers.into_iter(), 400, tag, &[]))
}

/// A response from raw header values: every Via, From, To (tagged), Call-ID and CSeq,
/// compact names understood.
fn raw_response(
    headers: impl Iterator<Item = (String, Vec<u8>)>,
    code: u16,
    tag: &str,
    extra: &[(&'static str, String)],
) -> Bytes {
    let mut out = format!("SIP/2.0 {code} {}\r\n", reason(code)).into_bytes();
    for (name, value) in headers {
        let canonical = match name.to_ascii_lowercase().as_str() {
            "via" | "v" => "Via",
            "from" | "f" => "From",
            "to" | "t" => "To",
            "call-id" | "i" => "Call-ID",
            "cseq" => "CSeq",
            _ => continue,
        };
        // Header values cannot carry a line break into our response.
        let value: Vec<u8> = value
            .into_iter()
            .filter(|b| *b != b'\r' && *b != b'\n')
            .collect();
        out.extend_from_slice(canonical.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&value);
        if canonical == "To" && find(&value, b";tag=").is_none() && code > 100 {
            out.extend_from_slice(format!(";tag={tag}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Server: Parley/0.1\r\nContent-Length: 0\r\n\r\n");
    Bytes::from(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `b` without leading and trailing ASCII whitespace.
pub(crate) fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}
