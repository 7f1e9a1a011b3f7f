//! Small helpers over `sipx-sip` messages.

use bytes::Bytes;
use rand::Rng;
use sipx_sip::headers::{Address, CallId, Contact, From, To};
use sipx_sip::{CSeq, HeaderName, Request, Response, ResponseBuilder, StatusCode};

/// A random token for tags and branches.
pub fn token(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// A new RFC 3261 branch.
pub fn branch() -> String {
    format!("z9hG4bK{}", token(16))
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

/// Checks that a request carries what every transaction and dialog needs; `Err` names the
/// first fault (used as the 400 reason and as a metric label).
pub fn validate_request(req: &Request) -> Result<(), &'static str> {
    if !matches!(req.headers.typed::<sipx_sip::Via>(), Some(Ok(_))) {
        return Err("bad Via");
    }
    if from_addr(&req.headers).is_none() {
        return Err("bad From");
    }
    if !matches!(req.headers.typed::<To>(), Some(Ok(_))) {
        return Err("bad To");
    }
    if call_id(&req.headers).is_none() {
        return Err("bad Call-ID");
    }
    match cseq(&req.headers) {
        Some(c) if c.method == req.method => {}
        _ => return Err("bad CSeq"),
    }
    if let Some(mf) = req.headers.typed::<sipx_sip::headers::MaxForwards>()
        && mf.is_err()
    {
        return Err("bad Max-Forwards");
    }
    Ok(())
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
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        603 => "Decline",
        _ => "Unknown",
    }
}
