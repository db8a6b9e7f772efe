//! Parsers of flag values: sizes, chunk sizes and durations, as clap's
//! value parsers call them.
//!
//! Owns the textual forms of those values; pure functions only.

use std::time::Duration;

use nightpass_proto::chunk::ChunkSize;

/// Parses a size: `65536`, `64K`, `64KiB`, `1.5G`, `2T` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    let v = n * mult as f64;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v.round() as u64)
}

/// Parses `--metrics HOST:PORT` (a host name is resolved; its first
/// address is used).
pub fn parse_metrics_addr(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("'{s}' names no address"))
}

/// Parses a chunk size into a [`ChunkSize`].
pub fn parse_chunk_size(s: &str) -> std::result::Result<ChunkSize, String> {
    ChunkSize::new(parse_size(s)?).map_err(|e| e.to_string())
}

/// Parses a duration: `90s`, `45m`, `6h`, `1h30m`, `500ms`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<f64>() {
        return Ok(Duration::from_secs_f64(n.max(0.0)));
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration"))?;
        num.clear();
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                's' => 1.0,
                'm' => 60.0,
                'h' => 3600.0,
                'd' => 86400.0,
                _ => {
                    return Err(format!(
                        "'{s}' is not a duration (use e.g. 90s, 45m, 1h30m)"
                    ))
                }
            }
        };
        total += n * unit;
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!(
            "'{s}' is not a duration (use e.g. 90s, 45m, 1h30m)"
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("64K").unwrap().bytes(), 65536);
        assert!(parse_chunk_size("3K").is_err());
        assert!(parse_chunk_size("128M").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45m"), Ok(Duration::from_secs(2700)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(21600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("1h30").is_err());
    }
}
