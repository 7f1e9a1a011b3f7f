//! Telephone numbers: E.164 normalisation through `phonenumber` (a port of Google's
//! libphonenumber, with its metadata), so that "+1 555 0100 001", "15550100001" and
//! "tel:+15550100001" all become "+15550100001".

/// Normalises a dialled or presented number to E.164, or `None` if it is not one.
///
/// `region` applies to numbers written without a leading `+`.
pub fn to_e164(raw: &str, region: &str) -> Option<String> {
    let s = raw.trim().trim_start_matches("tel:");
    if s.is_empty()
        || !s.chars().any(|c| c.is_ascii_digit())
        || s.chars().any(|c| c.is_ascii_alphabetic())
    {
        return None;
    }
    let region: Option<phonenumber::country::Id> = region.parse().ok();
    // A bare string of 11+ digits is often an international number without its `+`
    // (digits counted: "(555) 777-0001" is a national number of ten).
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let candidates = if !s.starts_with('+') && digits > 10 {
        vec![format!("+{s}"), s.to_owned()]
    } else {
        vec![s.to_owned()]
    };
    for c in candidates {
        // An international number is parsed without a region: with one, `phonenumber`
        // strips that region's national prefix after the country code (+33 1… read with
        // US gave +33 9…, losing the 1).
        let region = if c.starts_with('+') { None } else { region };
        if let Ok(n) = phonenumber::parse(region, &c) {
            return Some(n.format().mode(phonenumber::Mode::E164).to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_numbers_normalise_the_same_from_any_region() {
        for region in ["US", "FR"] {
            assert_eq!(
                to_e164("+33199999999", region).as_deref(),
                Some("+33199999999"),
                "{region}"
            );
        }
        assert_eq!(
            to_e164("+33 1 99 99 99 99", "FR").as_deref(),
            Some("+33199999999")
        );
    }

    #[test]
    fn normalises() {
        assert_eq!(
            to_e164("+15550100001", "US").as_deref(),
            Some("+15550100001")
        );
        assert_eq!(
            to_e164("15550100001", "US").as_deref(),
            Some("+15550100001")
        );
        assert_eq!(
            to_e164("tel:+1 555 0100 002", "US").as_deref(),
            Some("+15550100002")
        );
        assert_eq!(
            to_e164("+44 20 7946 0958", "US").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            to_e164("(555) 777-0001", "US").as_deref(),
            Some("+15557770001")
        );
        assert_eq!(
            to_e164("1 (555) 777-0001", "US").as_deref(),
            Some("+15557770001")
        );
        assert_eq!(to_e164("sipp", "US"), None);
        assert_eq!(to_e164("", "US"), None);
        assert_eq!(to_e164("service", "US"), None);
    }
}
