//! Why the SIP side refuses a message: one typed error, with the status it is answered
//! with and the label it is counted under (`parley_sip_parse_errors_total{reason}`).

/// A SIP message or request the core will not process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SipError {
    /// The datagram is not a SIP message. Answered 400 when its headers still say where
    /// to (a request with a readable Via), dropped otherwise.
    #[error("unparseable SIP message: {0}")]
    Unparseable(String),
    /// A header every transaction and dialog needs is missing or malformed, repeated where
    /// one is allowed, or a header we read (Contact, Date) does not parse.
    #[error("bad {0}")]
    BadHeader(&'static str),
    /// The request-line names a SIP version other than 2.0 (RFC 3261 §8.2.2; 505).
    #[error("unsupported SIP version")]
    Version,
    /// The Request-URI carries headers (`?…`; RFC 3261 §19.1.1 forbids it).
    #[error("Request-URI with headers")]
    UriHeaders,
    /// The CSeq method differs from the request-line's.
    #[error("CSeq method does not match the request")]
    CSeqMismatch,
    /// The Request-URI's scheme is not sip, sips or tel (RFC 3261 §8.2.2.1; 416).
    #[error("unsupported Request-URI scheme")]
    UnsupportedScheme,
    /// `Require` names extensions we do not support (RFC 3261 §8.2.2.3; 420 with
    /// `Unsupported`).
    #[error("unsupported extensions required: {}", .0.join(", "))]
    BadExtension(Vec<String>),
    /// The body is not SDP (RFC 3261 §8.2.3; 415 with `Accept: application/sdp`).
    #[error("unsupported body type")]
    UnsupportedMediaType,
    /// `Accept` rules out SDP, the only body we answer with (RFC 3261 §21.4.7; 406).
    #[error("our answer (SDP) is not acceptable to the caller")]
    NotAcceptable,
    /// Max-Forwards reached zero.
    #[error("too many hops")]
    TooManyHops,
    /// The SDP offer has no audio we can relay.
    #[error("no usable audio in the SDP offer")]
    BadSdp,
    /// Over a capacity limit (transactions, calls from the source): 503 with
    /// `Retry-After` (RFC 3261 §21.5.4).
    #[error("overloaded")]
    Overloaded,
}

/// Seconds a peer refused for overload is told to wait (`Retry-After`).
pub const OVERLOAD_RETRY_AFTER_SECS: u32 = 5;

impl SipError {
    /// The status a request with this fault is answered with.
    pub fn status(&self) -> u16 {
        match self {
            SipError::Unparseable(_)
            | SipError::BadHeader(_)
            | SipError::UriHeaders
            | SipError::CSeqMismatch => 400,
            SipError::Version => 505,
            SipError::UnsupportedScheme => 416,
            SipError::BadExtension(_) => 420,
            SipError::UnsupportedMediaType => 415,
            SipError::NotAcceptable => 406,
            SipError::TooManyHops => 483,
            SipError::BadSdp => 488,
            SipError::Overloaded => 503,
        }
    }

    /// The metric label.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            SipError::Unparseable(_) => "unparseable",
            SipError::BadHeader(_) | SipError::UriHeaders | SipError::CSeqMismatch => "bad_header",
            SipError::Version => "bad_version",
            SipError::UnsupportedScheme => "bad_scheme",
            SipError::BadExtension(_) => "bad_extension",
            SipError::UnsupportedMediaType | SipError::NotAcceptable => "bad_content_type",
            SipError::TooManyHops => "too_many_hops",
            SipError::BadSdp => "bad_sdp",
            SipError::Overloaded => "overloaded",
        }
    }

    /// Headers the response must carry besides the usual ones (RFC 3261 §20.40, §21.4.13).
    pub fn extra_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            SipError::BadExtension(tags) => vec![("Unsupported", tags.join(", "))],
            SipError::UnsupportedMediaType | SipError::NotAcceptable => {
                vec![("Accept", "application/sdp".into())]
            }
            SipError::Overloaded => vec![("Retry-After", OVERLOAD_RETRY_AFTER_SECS.to_string())],
            _ => Vec::new(),
        }
    }
}
