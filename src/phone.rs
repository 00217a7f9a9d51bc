//! Phone numbers: everything is compared and stored as E.164, read with a default region.

use phonenumber::{Mode, country};

/// Parse a region code like `IN`.
///
/// # Errors
/// Unknown region.
pub fn region(code: &str) -> Result<country::Id, String> {
    code.trim()
        .to_ascii_uppercase()
        .parse::<country::Id>()
        .map_err(|_| format!("unknown region {code:?}"))
}

/// Normalise a number to E.164, reading national forms (`09876543210`, `9876543210`) in
/// `default_region`.
///
/// # Errors
/// A human-readable reason when the input is not a plausible phone number.
pub fn to_e164(input: &str, default_region: &str) -> Result<String, String> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err("is empty".into());
    }
    if trimmed.len() > 32 {
        return Err("is too long for a phone number".into());
    }
    let region = region(default_region)?;
    // Exotel and many CRMs drop the '+' but keep the country code ("919876543210").
    let candidate = if !trimmed.starts_with('+')
        && !trimmed.starts_with('0')
        && trimmed.chars().filter(char::is_ascii_digit).count() > 10
    {
        format!("+{trimmed}")
    } else {
        trimmed.to_owned()
    };
    let parsed = phonenumber::parse(Some(region), &candidate)
        .or_else(|_| phonenumber::parse(Some(region), trimmed))
        .map_err(|e| format!("is not a phone number ({e})"))?;
    if !phonenumber::is_valid(&parsed) {
        return Err("is not a valid phone number".into());
    }
    Ok(parsed.format().mode(Mode::E164).to_string())
}

/// The national form Exotel dials (`0` + national significant number), for regions that use a
/// trunk prefix; E.164 otherwise.
#[must_use]
pub fn to_national_dialing(e164: &str) -> String {
    match phonenumber::parse(None, e164) {
        Ok(n) if n.code().value() == 91 => format!("0{}", n.national().value()),
        _ => e164.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indian_forms_normalise_to_e164() {
        for input in [
            "+91 98765 43210",
            "09876543210",
            "9876543210",
            "919876543210",
            "+919876543210",
        ] {
            assert_eq!(to_e164(input, "IN").unwrap(), "+919876543210", "{input}");
        }
    }

    #[test]
    fn other_regions_and_garbage() {
        assert_eq!(to_e164("+1 415 555 2671", "IN").unwrap(), "+14155552671");
        assert!(to_e164("hello", "IN").is_err());
        assert!(to_e164("", "IN").is_err());
        assert!(to_e164("123", "IN").is_err());
    }

    #[test]
    fn national_dialing_form() {
        assert_eq!(to_national_dialing("+919876543210"), "09876543210");
        assert_eq!(to_national_dialing("+14155552671"), "+14155552671");
    }
}
