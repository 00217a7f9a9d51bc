//! Exotel: the v1 voice API client ([`client`]) and the StatusCallback parser ([`callback`]).

pub mod callback;
pub mod client;

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};

pub use callback::{Leg, StatusCallback};
pub use client::{ConnectParams, ConnectedCall, ExotelAccount, ExotelClient, ExotelError};

/// Statuses after which a call never changes.
pub const TERMINAL_STATUSES: &[&str] = &["completed", "failed", "busy", "no-answer", "canceled"];

/// Whether `status` is final.
#[must_use]
pub fn is_terminal(status: &str) -> bool {
    TERMINAL_STATUSES.contains(&status)
}

/// Parse `+05:30` / `-03:00` / `Z`.
///
/// # Errors
/// Not an offset.
pub fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s == "+00:00" {
        return Ok(FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!()));
    }
    let sign = match s.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(format!("{s:?} is not an offset")),
    };
    let (h, m) = s[1..]
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not an offset"))?;
    let h: i32 = h.parse().map_err(|_| format!("{s:?} is not an offset"))?;
    let m: i32 = m.parse().map_err(|_| format!("{s:?} is not an offset"))?;
    if h > 14 || m > 59 {
        return Err(format!("{s:?} is out of range"));
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(|| format!("{s:?} out of range"))
}

/// Read one of Exotel's offset-less timestamps (`2019-04-08 03:17:59`) in `offset`.
/// Placeholders (`1970-01-01 05:30:00`, `0000-00-00 00:00:00`) and junk read as `None`.
#[must_use]
pub fn parse_time(s: &str, offset: FixedOffset) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if s.is_empty() || s.starts_with("0000") || s.starts_with("1970-01-01") {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").ok()?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|dt| dt.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ist_times_become_utc() {
        let ist = parse_offset("+05:30").unwrap();
        let t = parse_time("2019-04-08 03:17:59", ist).unwrap();
        assert_eq!(t.to_rfc3339(), "2019-04-07T21:47:59+00:00");
        assert!(parse_time("1970-01-01 05:30:00", ist).is_none());
        assert!(parse_time("0000-00-00 00:00:00", ist).is_none());
        assert!(parse_time("soon", ist).is_none());
    }

    #[test]
    fn offsets() {
        assert!(parse_offset("+05:30").is_ok());
        assert!(parse_offset("-03:00").is_ok());
        assert!(parse_offset("5:30").is_err());
        assert!(parse_offset("+25:00").is_err());
    }
}
