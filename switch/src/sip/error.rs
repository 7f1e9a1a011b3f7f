//! Why the SIP side refuses a message: one typed error, with the status it is answered
//! with and the label it is counted under (`parley_sip_parse_errors_total{reason}`).

/// A SIP message or request the core will not process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SipError {
    /// The datagram is not a SIP message (dropped: there is nothing to answer).
    #[error("unparseable SIP message: {0}")]
    Unparseable(String),
    /// A header every transaction and dialog needs is missing or malformed.
    #[error("bad {0}")]
    BadHeader(&'static str),
    /// Max-Forwards reached zero.
    #[error("too many hops")]
    TooManyHops,
    /// The SDP offer has no audio we can relay.
    #[error("no usable audio in the SDP offer")]
    BadSdp,
}

impl SipError {
    /// The status a request with this fault is answered with.
    pub fn status(&self) -> u16 {
        match self {
            SipError::Unparseable(_) | SipError::BadHeader(_) => 400,
            SipError::TooManyHops => 483,
            SipError::BadSdp => 488,
        }
    }

    /// The metric label.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            SipError::Unparseable(_) => "unparseable",
            SipError::BadHeader(_) => "bad_header",
            SipError::TooManyHops => "too_many_hops",
            SipError::BadSdp => "bad_sdp",
        }
    }
}
