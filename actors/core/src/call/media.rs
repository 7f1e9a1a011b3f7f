//! How an answered call's media is wired: which relay topology, which payload type, and
//! whether video rides along. A pure decision from what signalling learned; the call actor
//! carries it out against the relay.

use std::net::SocketAddr;

use parley_codecs::control::{PT_OPUS, PT_TELEPHONE_EVENT};
use parley_codecs::g711::PT_PCMU;
use parley_codecs::sdp::MediaDescription;

use crate::ids::SessionId;
use crate::plan::LegId;

/// Who placed the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A SIP gateway (or trunk) through the SIP core.
    Sip,
    /// An IM device, by session.
    Device(SessionId),
}

/// The video stream of a gateway call relayed to a device that takes video.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoPlan {
    /// Where the caller receives video.
    pub caller: SocketAddr,
    /// The caller's video formats, answered as offered (the relay does not transcode).
    pub formats: Vec<parley_codecs::sdp::Format>,
}

/// The media of an answered call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaPlan {
    /// A SIP caller's RTP (UDP) to a device's RoQ flow; answer the caller with `pt`.
    SipToDevice {
        /// Where the caller receives audio.
        caller: SocketAddr,
        /// The device.
        session: SessionId,
        /// Payload type for both sides.
        pt: u8,
        /// The caller's telephone-event payload type, answered back.
        telephone_event: Option<u8>,
        /// Video relayed to the device, when both ends take it.
        video: Option<VideoPlan>,
        /// Whether the caller offered video (refused with port 0 when `video` is `None`).
        video_offered: bool,
    },
    /// A SIP caller's RTP to the trunk's, UDP to UDP.
    SipToTrunk {
        /// Where the caller receives audio.
        caller: SocketAddr,
        /// Where the trunk receives audio.
        trunk: SocketAddr,
        /// The payload type the trunk chose.
        pt: u8,
        /// The caller's telephone-event payload type, answered back.
        telephone_event: Option<u8>,
        /// Whether the caller offered video (refused: the PSTN line is audio-only).
        video_offered: bool,
    },
    /// Device to device: a RoQ flow on each side.
    DeviceToDevice {
        /// The dialling device.
        caller: SessionId,
        /// The device that answered.
        callee: SessionId,
        /// Payload type: Opus when both declared it, else PCMU (every device takes G.711).
        pt: u8,
        /// Telephone-event payload type (Parley's own number between devices).
        telephone_event: u8,
    },
    /// A device dialled a PSTN number: its RoQ flow to the trunk's RTP.
    DeviceToTrunk {
        /// The dialling device.
        caller: SessionId,
        /// Where the trunk receives audio.
        trunk: SocketAddr,
        /// The payload type the trunk chose.
        pt: u8,
        /// The trunk's telephone-event payload type, when it answered one.
        telephone_event: Option<u8>,
    },
}

impl MediaPlan {
    /// Whether the relay's "caller" side (the UDP side it counts first) is the callee of
    /// the call, so that CDR packet counts must be swapped: a device dialling the PSTN
    /// has the trunk on the relay's UDP side.
    pub fn counts_swapped(&self) -> bool {
        matches!(self, MediaPlan::DeviceToTrunk { .. })
    }
}

/// Why the answered leg's media cannot be wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaPlanError {
    /// The trunk answered without usable audio we recorded.
    #[error("the trunk's answer has no usable audio")]
    NoTrunkMedia,
}

/// What the answering device declared it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Takes {
    /// Video.
    pub video: bool,
    /// Opus.
    pub opus: bool,
}

/// Decides the media of a call from `origin` answered on `leg`.
///
/// `offer` is the caller's audio offer (a device's offer, [`crate::dial::device_offer`],
/// for dialled calls), `video_offer` the caller's video, `trunk` the trunk's answer when
/// the trunk answered, `takes` what the answering device declared.
pub fn plan_media(
    origin: Origin,
    leg: LegId,
    offer: &MediaDescription,
    video_offer: Option<&MediaDescription>,
    trunk: Option<&MediaDescription>,
    takes: Takes,
) -> Result<MediaPlan, MediaPlanError> {
    let trunk_te = trunk.and_then(MediaDescription::telephone_event);
    let caller = SocketAddr::new(offer.addr, offer.port);
    let trunk_pt = || {
        trunk
            .map(|t| {
                (
                    SocketAddr::new(t.addr, t.port),
                    t.first_g711().unwrap_or(PT_PCMU),
                )
            })
            .ok_or(MediaPlanError::NoTrunkMedia)
    };
    Ok(match (origin, leg) {
        (Origin::Sip, LegId::Device(session)) => MediaPlan::SipToDevice {
            caller,
            session,
            pt: offer.first_g711().unwrap_or(PT_PCMU),
            telephone_event: offer.telephone_event(),
            video: video_offer.filter(|_| takes.video).map(|v| VideoPlan {
                caller: SocketAddr::new(v.addr, v.port),
                formats: v.formats.clone(),
            }),
            video_offered: video_offer.is_some(),
        },
        (Origin::Sip, LegId::Trunk) => {
            let (trunk, pt) = trunk_pt()?;
            MediaPlan::SipToTrunk {
                caller,
                trunk,
                pt,
                telephone_event: offer.telephone_event(),
                video_offered: video_offer.is_some(),
            }
        }
        (Origin::Device(caller), LegId::Device(callee)) => MediaPlan::DeviceToDevice {
            caller,
            callee,
            pt: if takes.opus && offer.formats.iter().any(|f| f.name == "OPUS") {
                PT_OPUS
            } else {
                PT_PCMU
            },
            telephone_event: PT_TELEPHONE_EVENT,
        },
        (Origin::Device(caller), LegId::Trunk) => {
            let (trunk, pt) = trunk_pt()?;
            MediaPlan::DeviceToTrunk {
                caller,
                trunk,
                pt,
                telephone_event: trunk_te,
            }
        }
    })
}

/// The G.711 payload types offered to the trunk: the caller's, or PCMU when it offered
/// none we relay.
pub fn trunk_formats(offer: &MediaDescription) -> Vec<u8> {
    let mut pts = offer.g711_formats();
    if pts.is_empty() {
        pts.push(PT_PCMU);
    }
    pts
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_codecs::g711::PT_PCMA;
    use parley_codecs::sdp::{Format, MediaKind};

    fn md(kind: MediaKind, port: u16, pts: &[(u8, &str)]) -> MediaDescription {
        MediaDescription {
            kind,
            addr: "127.0.0.1".parse().unwrap(),
            port,
            formats: pts
                .iter()
                .map(|(pt, name)| Format {
                    pt: *pt,
                    name: (*name).into(),
                    clock: if kind == MediaKind::Audio {
                        8000
                    } else {
                        90000
                    },
                })
                .collect(),
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::new("127.0.0.1".parse().unwrap(), port)
    }

    type Planned = Result<MediaPlan, MediaPlanError>;

    #[test]
    fn topology_per_origin_and_leg() {
        let gw = md(
            MediaKind::Audio,
            6000,
            &[(8, "PCMA"), (0, "PCMU"), (101, "TELEPHONE-EVENT")],
        );
        let video = md(MediaKind::Video, 6002, &[(96, "VP8")]);
        let trunk = md(MediaKind::Audio, 7000, &[(0, "PCMU")]);
        let trunk_te = md(
            MediaKind::Audio,
            7000,
            &[(0, "PCMU"), (96, "TELEPHONE-EVENT")],
        );
        let dev_offer = crate::dial::device_offer(false);
        let opus_offer = crate::dial::device_offer(true);
        let both = Takes {
            video: false,
            opus: true,
        };
        let rows: Vec<(&str, Planned, Planned)> = vec![
            (
                "gateway to a video device: the caller's first G.711, video relayed",
                plan_media(
                    Origin::Sip,
                    LegId::Device(4),
                    &gw,
                    Some(&video),
                    None,
                    Takes {
                        video: true,
                        opus: false,
                    },
                ),
                Ok(MediaPlan::SipToDevice {
                    caller: addr(6000),
                    session: 4,
                    pt: PT_PCMA,
                    telephone_event: Some(101),
                    video: Some(VideoPlan {
                        caller: addr(6002),
                        formats: video.formats.clone(),
                    }),
                    video_offered: true,
                }),
            ),
            (
                "gateway to an audio-only device: video offered, refused",
                plan_media(
                    Origin::Sip,
                    LegId::Device(4),
                    &gw,
                    Some(&video),
                    None,
                    Takes::default(),
                ),
                Ok(MediaPlan::SipToDevice {
                    caller: addr(6000),
                    session: 4,
                    pt: PT_PCMA,
                    telephone_event: Some(101),
                    video: None,
                    video_offered: true,
                }),
            ),
            (
                "gateway to trunk: the trunk's choice of codec",
                plan_media(
                    Origin::Sip,
                    LegId::Trunk,
                    &gw,
                    None,
                    Some(&trunk),
                    Takes::default(),
                ),
                Ok(MediaPlan::SipToTrunk {
                    caller: addr(6000),
                    trunk: addr(7000),
                    pt: PT_PCMU,
                    telephone_event: Some(101),
                    video_offered: false,
                }),
            ),
            (
                "device to device: PCMU on RoQ both ways",
                plan_media(
                    Origin::Device(1),
                    LegId::Device(2),
                    &dev_offer,
                    None,
                    None,
                    both,
                ),
                Ok(MediaPlan::DeviceToDevice {
                    caller: 1,
                    callee: 2,
                    pt: PT_PCMU,
                    telephone_event: PT_TELEPHONE_EVENT,
                }),
            ),
            (
                "device to device, both take Opus: Opus",
                plan_media(
                    Origin::Device(1),
                    LegId::Device(2),
                    &opus_offer,
                    None,
                    None,
                    both,
                ),
                Ok(MediaPlan::DeviceToDevice {
                    caller: 1,
                    callee: 2,
                    pt: PT_OPUS,
                    telephone_event: PT_TELEPHONE_EVENT,
                }),
            ),
            (
                "an Opus caller to a G.711-only device: PCMU",
                plan_media(
                    Origin::Device(1),
                    LegId::Device(2),
                    &opus_offer,
                    None,
                    None,
                    Takes::default(),
                ),
                Ok(MediaPlan::DeviceToDevice {
                    caller: 1,
                    callee: 2,
                    pt: PT_PCMU,
                    telephone_event: PT_TELEPHONE_EVENT,
                }),
            ),
            (
                "device to PSTN",
                plan_media(
                    Origin::Device(1),
                    LegId::Trunk,
                    &dev_offer,
                    None,
                    Some(&trunk),
                    Takes::default(),
                ),
                Ok(MediaPlan::DeviceToTrunk {
                    caller: 1,
                    trunk: addr(7000),
                    pt: PT_PCMU,
                    telephone_event: None,
                }),
            ),
            (
                "an Opus device to PSTN: G.711, with the trunk's telephone-event",
                plan_media(
                    Origin::Device(1),
                    LegId::Trunk,
                    &opus_offer,
                    None,
                    Some(&trunk_te),
                    both,
                ),
                Ok(MediaPlan::DeviceToTrunk {
                    caller: 1,
                    trunk: addr(7000),
                    pt: PT_PCMU,
                    telephone_event: Some(96),
                }),
            ),
            (
                "trunk answered without media we kept",
                plan_media(Origin::Sip, LegId::Trunk, &gw, None, None, Takes::default()),
                Err(MediaPlanError::NoTrunkMedia),
            ),
        ];
        for (name, got, want) in rows {
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn only_a_device_dialling_the_pstn_swaps_the_counts() {
        let t = MediaPlan::DeviceToTrunk {
            caller: 1,
            trunk: addr(1),
            pt: 0,
            telephone_event: None,
        };
        assert!(t.counts_swapped());
        assert!(
            !MediaPlan::DeviceToDevice {
                caller: 1,
                callee: 2,
                pt: 0,
                telephone_event: PT_TELEPHONE_EVENT,
            }
            .counts_swapped()
        );
    }

    #[test]
    fn the_trunk_is_offered_the_callers_g711_or_pcmu() {
        let gw = md(
            MediaKind::Audio,
            6000,
            &[(8, "PCMA"), (101, "TELEPHONE-EVENT")],
        );
        assert_eq!(trunk_formats(&gw), vec![PT_PCMA]);
        let none = md(MediaKind::Audio, 6000, &[(18, "G729")]);
        assert_eq!(trunk_formats(&none), vec![PT_PCMU]);
    }
}
