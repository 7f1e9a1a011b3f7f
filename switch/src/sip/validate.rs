//! What a request must satisfy before the core acts on it, in RFC 3261 §8.2's order:
//! structure (`sipx-sip`'s `validate_request`: required and single-value headers, CSeq
//! method, version, Request-URI headers), the headers we read, the Request-URI scheme
//! (416), `Require` (420), and for INVITEs the body type (415) and `Accept` (406). Each
//! fault is a [`SipError`] that knows its status; RFC 4475's torture messages are the test
//! (`switch/tests/rfc4475.rs`).

use sipx_sip::headers::{Contact, ContentType, Date, Require};
use sipx_sip::uri::Scheme;
use sipx_sip::validate::Finding;
use sipx_sip::{HeaderName, Method, Request};

use super::error::SipError;

/// Extensions (`Require` option tags) the node supports: none yet.
const SUPPORTED: &[&str] = &[];

/// Checks `req`; the first fault found, in the order the RFC answers them.
pub fn check_request(req: &Request) -> Result<(), SipError> {
    let findings = sipx_sip::validate::validate_request(req);
    if findings.contains(&Finding::UnsupportedVersion) {
        return Err(SipError::Version);
    }
    for f in findings {
        return Err(match f {
            Finding::MissingRequiredHeader(h) | Finding::MalformedRequiredHeader(h)
                if f.is_repairable() && h == "Max-Forwards" =>
            {
                continue;
            }
            Finding::MissingRequiredHeader(h)
            | Finding::MalformedRequiredHeader(h)
            | Finding::RepeatedSingleValueHeader(h) => SipError::BadHeader(h),
            Finding::CSeqMethodMismatch => SipError::CSeqMismatch,
            Finding::RequestUriHasHeaders => SipError::UriHeaders,
            _ => SipError::BadHeader("request"),
        });
    }
    if matches!(
        req.headers.typed::<sipx_sip::headers::MaxForwards>(),
        Some(Err(_))
    ) {
        return Err(SipError::BadHeader("Max-Forwards"));
    }
    if matches!(req.headers.typed::<Contact>(), Some(Err(_))) {
        return Err(SipError::BadHeader("Contact"));
    }
    if matches!(req.headers.typed::<Date>(), Some(Err(_))) {
        return Err(SipError::BadHeader("Date"));
    }
    if req.headers.count(&HeaderName::ContentLength) > 1 {
        return Err(SipError::BadHeader("Content-Length"));
    }
    if matches!(req.uri.scheme(), Scheme::Other(_)) {
        return Err(SipError::UnsupportedScheme);
    }
    if !matches!(req.method, Method::Ack | Method::Cancel) {
        let unsupported: Vec<String> = req
            .headers
            .typed_all::<Require>()
            .filter_map(Result::ok)
            .flat_map(|r| r.0.0)
            .map(|t| String::from_utf8_lossy(&t).into_owned())
            .filter(|t| !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .collect();
        if !unsupported.is_empty() {
            return Err(SipError::BadExtension(unsupported));
        }
    }
    if req.method == Method::Invite {
        if !req.body().is_empty() {
            match req.headers.typed::<ContentType>() {
                Some(Ok(ct)) if ct.is("application", "sdp") => {}
                _ => return Err(SipError::UnsupportedMediaType),
            }
        }
        if !accepts_sdp(req) {
            return Err(SipError::NotAcceptable);
        }
    }
    Ok(())
}

/// Whether the request's `Accept` (absent: SDP, RFC 3261 §20.1) admits an SDP answer.
fn accepts_sdp(req: &Request) -> bool {
    let values: Vec<String> = req
        .headers
        .get_all(&HeaderName::Accept)
        .map(|h| String::from_utf8_lossy(&h.value()).to_ascii_lowercase())
        .collect();
    if values.is_empty() || values.iter().all(|v| v.trim().is_empty()) {
        return true;
    }
    values.iter().flat_map(|v| v.split(',')).any(|range| {
        let range = range.split(';').next().unwrap_or("").trim();
        matches!(range, "application/sdp" | "application/*" | "*/*")
    })
}
