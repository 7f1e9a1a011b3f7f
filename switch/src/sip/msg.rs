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

/// Checks that a request carries what every transaction and dialog needs; `Err` names the
/// first fault.
pub fn validate_request(req: &Request) -> Result<(), SipError> {
    if !matches!(req.headers.typed::<sipx_sip::Via>(), Some(Ok(_))) {
        return Err(SipError::BadHeader("Via"));
    }
    if from_addr(&req.headers).is_none() {
        return Err(SipError::BadHeader("From"));
    }
    if !matches!(req.headers.typed::<To>(), Some(Ok(_))) {
        return Err(SipError::BadHeader("To"));
    }
    if call_id(&req.headers).is_none() {
        return Err(SipError::BadHeader("Call-ID"));
    }
    match cseq(&req.headers) {
        Some(c) if c.method == req.method => {}
        _ => return Err(SipError::BadHeader("CSeq")),
    }
    if let Some(mf) = req.headers.typed::<sipx_sip::headers::MaxForwards>()
        && mf.is_err()
    {
        return Err(SipError::BadHeader("Max-Forwards"));
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
        482 => "Loop Detected",
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
