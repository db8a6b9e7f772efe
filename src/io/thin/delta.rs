//! The reader of `thin_delta`'s output: the XML the tool prints, in its
//! plain and its `--verbose` form, into the 4 KiB blocks that changed.
//!
//! Owns the output's grammar only; running the tool belongs to
//! [`super::thin_delta`]. Reads as a stream (one tag at a time, each at
//! most [`MAX_TAG`] bytes), so a pool of millions of runs costs no more
//! memory than its change set. Anything it does not understand is an
//! error, never a guess: the caller falls back to a full pass.
//!
//! ## The grammar (thin-provisioning-tools 0.9.0 on this machine; the same
//! elements in 1.x, `src/thin/delta_visitor.rs`)
//! ```text
//! <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1024">
//!   <diff left="1" right="2">
//!     <same begin="0" length="2"/>
//!     <different begin="2" length="2"/>
//!     <left_only begin="20" length="1"/>
//!     <right_only begin="30" length="1"/>
//!   </diff>
//! </superblock>
//! ```
//! `begin` and `length` count data blocks of the thin volumes' address
//! space; `data_block_size` is in 512-byte sectors. `--verbose` wraps
//! `<range begin=".." data_begin=".." length=".."/>` elements (a
//! `different` range has `left_data_begin` and `right_data_begin`) in
//! `<same>`..`</same>` and its siblings. The 1.x tools may add `flags` and
//! `metadata_snap` to the superblock and name a diff's sides `left_root` and
//! `right_root`; unknown attributes are ignored, unknown elements refused.

use std::io::{BufRead, Read};

use nightpass_proto::changes::{blocks_of_sectors, BlockRuns, SECTOR};

use crate::error::{Error, Result};

/// Longest tag read, in bytes: the tool's longest is well under 200.
pub const MAX_TAG: u64 = 64 * 1024;

/// What one `thin_delta` run reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The thin id of the left side (`--snap1`), when named by id.
    pub left: Option<u64>,
    /// The thin id of the right side (`--snap2`), when named by id.
    pub right: Option<u64>,
    /// The pool's data block, in 512-byte sectors.
    pub data_block_sectors: u64,
    /// Every 4 KiB block of a range that is not `same`: mapped differently,
    /// or mapped on one side only.
    pub changed: BlockRuns,
}

/// Parses `thin_delta`'s whole output.
pub fn parse_delta(text: &str) -> Result<Delta> {
    parse_delta_from(text.as_bytes())
}

/// Parses `thin_delta`'s output from a stream, to its end.
pub fn parse_delta_from(r: impl BufRead) -> Result<Delta> {
    let mut tags = Tags { r, buf: Vec::new() };
    let sb = tags.expect_open("superblock")?;
    let data_block_sectors = sb.num("data_block_size")?;
    if data_block_sectors == 0 {
        return Err(bad("a data_block_size of 0"));
    }
    let diff = tags.expect_open("diff")?;
    let mut out = Delta {
        left: diff.opt_num("left")?,
        right: diff.opt_num("right")?,
        data_block_sectors,
        changed: BlockRuns::new(),
    };
    let mut ranges = Ranges {
        sectors: data_block_sectors,
        next: 0,
    };
    loop {
        let tag = tags
            .next_tag()?
            .ok_or_else(|| bad("its end before </diff>"))?;
        match (tag.form, kind_of(&tag.name)) {
            (Form::Close, _) if tag.name == "diff" => break,
            (Form::Empty, Some(kind)) => ranges.add(&tag, kind, &mut out.changed)?,
            (Form::Open, Some(kind)) => loop {
                let inner = tags
                    .next_tag()?
                    .ok_or_else(|| bad("its end inside a run"))?;
                match inner.form {
                    Form::Close if inner.name == tag.name => break,
                    Form::Empty if inner.name == "range" => {
                        ranges.add(&inner, kind, &mut out.changed)?
                    }
                    _ => return Err(bad(format!("<{}> inside <{}>", inner.name, tag.name))),
                }
            },
            _ => return Err(bad(format!("{} inside <diff>", tag.describe()))),
        }
    }
    match tags.next_tag()? {
        Some(t) if t.form == Form::Close && t.name == "superblock" => {}
        Some(t) => return Err(bad(format!("{} after </diff>", t.describe()))),
        None => return Err(bad("its end before </superblock>")),
    }
    if let Some(t) = tags.next_tag()? {
        return Err(bad(format!("{} after </superblock>", t.describe())));
    }
    Ok(out)
}

/// An error about output we do not understand.
fn bad(what: impl std::fmt::Display) -> Error {
    Error::Io(format!(
        "thin_delta's output is not understood ({what}): refusing to guess a change set"
    ))
}

/// The kinds of run a diff holds; true for a change.
fn kind_of(name: &str) -> Option<bool> {
    match name {
        "same" => Some(false),
        "different" | "left_only" | "right_only" => Some(true),
        _ => None,
    }
}

/// Runs in ascending order, converted to 4 KiB blocks.
struct Ranges {
    sectors: u64,
    /// The first data block after the last run seen.
    next: u64,
}

impl Ranges {
    fn add(&mut self, tag: &Tag, changed: bool, set: &mut BlockRuns) -> Result<()> {
        let begin = tag.num("begin")?;
        let length = tag.num("length")?;
        let end = begin
            .checked_add(length)
            .ok_or_else(|| bad("a run past 2^64 blocks"))?;
        if begin < self.next {
            return Err(bad(format!(
                "a run at data block {begin} before the end of the previous one ({})",
                self.next
            )));
        }
        self.next = end;
        let end_bytes = end
            .checked_mul(self.sectors)
            .and_then(|s| s.checked_mul(SECTOR));
        if end_bytes.is_none() {
            return Err(bad(format!(
                "a run ending at data block {end}, past 2^64 bytes"
            )));
        }
        if changed {
            // Cannot overflow: end * sectors fits, as checked above.
            set.insert(blocks_of_sectors(
                begin * self.sectors,
                length * self.sectors,
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Open,
    Close,
    Empty,
}

/// One tag: its name, form and attributes (values undecoded).
#[derive(Debug)]
struct Tag {
    name: String,
    form: Form,
    attrs: Vec<(String, String)>,
}

impl Tag {
    fn describe(&self) -> String {
        match self.form {
            Form::Close => format!("</{}>", self.name),
            _ => format!("<{}>", self.name),
        }
    }

    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, key: &str) -> Result<u64> {
        self.opt_num(key)?
            .ok_or_else(|| bad(format!("<{}> without {key}", self.name)))
    }

    fn opt_num(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.attr(key) else {
            return Ok(None);
        };
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("{key}=\"{v}\" on <{}>", self.name)));
        }
        v.parse()
            .map(Some)
            .map_err(|_| bad(format!("{key}=\"{v}\" on <{}>, past 2^64", self.name)))
    }
}

/// A stream of tags, with nothing but white space between them.
struct Tags<R> {
    r: R,
    buf: Vec<u8>,
}

impl<R: BufRead> Tags<R> {
    fn read_error(e: std::io::Error) -> Error {
        Error::Io(format!("reading thin_delta's output: {e}"))
    }

    /// The next tag (an XML declaration skipped), or None at the end of
    /// the stream.
    fn next_tag(&mut self) -> Result<Option<Tag>> {
        loop {
            if !self.skip_to_tag()? {
                return Ok(None);
            }
            self.read_tag()?;
            let body = std::str::from_utf8(&self.buf[..self.buf.len() - 1])
                .map_err(|_| bad("a tag that is not UTF-8"))?;
            if !(body.starts_with("?xml") && body.ends_with('?')) {
                return parse_tag(body).map(Some);
            }
        }
    }

    /// Skips white space to the next `<`; false at the end of the stream.
    fn skip_to_tag(&mut self) -> Result<bool> {
        self.buf.clear();
        let n = Read::take(&mut self.r, MAX_TAG)
            .read_until(b'<', &mut self.buf)
            .map_err(Self::read_error)?;
        let at_tag = self.buf.last() == Some(&b'<');
        let text = if at_tag {
            &self.buf[..n - 1]
        } else {
            &self.buf[..]
        };
        if !text.iter().all(u8::is_ascii_whitespace) {
            return Err(bad("text outside a tag"));
        }
        if !at_tag && n as u64 >= MAX_TAG {
            return Err(bad("a run of white space too long"));
        }
        Ok(at_tag)
    }

    /// Reads into `buf` up to a `>` outside quotes, inclusive.
    fn read_tag(&mut self) -> Result<()> {
        self.buf.clear();
        loop {
            let left = MAX_TAG.saturating_sub(self.buf.len() as u64);
            if left == 0 {
                return Err(bad("a tag too long"));
            }
            let n = Read::take(&mut self.r, left)
                .read_until(b'>', &mut self.buf)
                .map_err(Self::read_error)?;
            if n == 0 || self.buf.last() != Some(&b'>') {
                return Err(if self.buf.len() as u64 >= MAX_TAG {
                    bad("a tag too long")
                } else {
                    bad("its end inside a tag")
                });
            }
            if quotes_closed(&self.buf) {
                return Ok(());
            }
        }
    }

    fn expect_open(&mut self, name: &str) -> Result<Tag> {
        match self.next_tag()? {
            Some(t) if t.form == Form::Open && t.name == name => Ok(t),
            Some(t) => Err(bad(format!("{} where <{name}> belongs", t.describe()))),
            None => Err(bad(format!("its end where <{name}> belongs"))),
        }
    }
}

/// Whether every quote opened in `s` is closed.
fn quotes_closed(s: &[u8]) -> bool {
    let mut open: Option<u8> = None;
    for &b in s {
        match open {
            None if b == b'"' || b == b'\'' => open = Some(b),
            Some(q) if b == q => open = None,
            _ => {}
        }
    }
    open.is_none()
}

/// A tag's body between `<` and `>`.
fn parse_tag(body: &str) -> Result<Tag> {
    let (form, inner) = if let Some(rest) = body.strip_prefix('/') {
        (Form::Close, rest)
    } else if let Some(rest) = body.strip_suffix('/') {
        (Form::Empty, rest)
    } else {
        (Form::Open, body)
    };
    let name_len = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .unwrap_or(inner.len());
    let name = &inner[..name_len];
    if name.is_empty() || !name.as_bytes()[0].is_ascii_alphabetic() {
        return Err(bad(format!("a tag <{}>", clip(body))));
    }
    let mut rest = &inner[name_len..];
    let mut attrs: Vec<(String, String)> = Vec::new();
    loop {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            break;
        }
        if trimmed.len() == rest.len() || form == Form::Close {
            return Err(bad(format!("a tag <{}>", clip(body))));
        }
        let (key, value, after) =
            attribute(trimmed).ok_or_else(|| bad(format!("a tag <{}>", clip(body))))?;
        if attrs.iter().any(|(k, _)| k == key) {
            return Err(bad(format!("{key} twice on <{name}>")));
        }
        attrs.push((key.to_string(), value.to_string()));
        rest = after;
    }
    Ok(Tag {
        name: name.to_string(),
        form,
        attrs,
    })
}

/// `key="value"` (or single quotes) at the start of `s`: key, value, rest.
fn attribute(s: &str) -> Option<(&str, &str, &str)> {
    let eq = s.find('=')?;
    let key = s[..eq].trim_end();
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
    {
        return None;
    }
    let after = s[eq + 1..].trim_start();
    let quote = after.chars().next().filter(|&c| c == '"' || c == '\'')?;
    let value_end = after[1..].find(quote)?;
    Some((key, &after[1..1 + value_end], &after[2 + value_end..]))
}

/// At most 60 characters of `s`, for a message.
fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests;
