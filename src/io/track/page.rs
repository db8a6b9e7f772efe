//! The kernel ring buffer's page format, parsed from bytes we never trust.
//!
//! Owns the layout of one page read from `per_cpu/cpuN/trace_pipe_raw` and
//! the walk over its records; knows nothing of files, events' fields or
//! devices. Every function here returns `None` or stops early on bytes that
//! do not fit the format: nothing a page holds may panic (a property test
//! feeds random pages).
//!
//! The format (kernel/trace/ring_buffer.c, `struct buffer_data_page` and
//! `struct ring_buffer_event`; described by `events/header_page` and
//! `events/header_event`):
//! - a page header: a u64 timestamp, then `commit` (a `local_t`, 8 bytes on
//!   64-bit kernels) whose low 30 bits are the number of data bytes used,
//!   bit 31 (`RB_MISSED_EVENTS`) set when events were lost before this page
//!   and bit 30 (`RB_MISSED_STORED`) when their count follows the data;
//! - records, each starting with a little-endian u32 holding `type_len`
//!   (low 5 bits) and `time_delta` (high 27 bits):
//!   - `type_len` 1..=28: a data record of `type_len * 4` bytes after the
//!     header word;
//!   - `type_len` 0: a data record whose length is the next u32
//!     (`array[0]`, counting itself), the payload after it;
//!   - 29: padding (a discarded event) of `array[0]` bytes after the header
//!     word; with `time_delta` 0 the rest of the page is empty;
//!   - 30: a time extend, 31: an absolute timestamp, 8 bytes each.

/// `RB_MISSED_EVENTS`: events were lost between the previous page and this.
const MISSED_EVENTS: u64 = 1 << 31;
/// `RB_MISSED_STORED`: the count of lost events is stored after the data.
const MISSED_STORED: u64 = 1 << 30;
/// The bits of `commit` that count data bytes.
const COMMIT_LEN_MASK: u64 = MISSED_STORED - 1;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;

/// Where a page's header fields lie and how large a page is, from
/// `events/header_page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLayout {
    /// Offset of `commit` in the page.
    pub commit_offset: usize,
    /// Size of `commit` (4 or 8).
    pub commit_size: usize,
    /// Offset of the first record.
    pub data_offset: usize,
    /// Bytes in one page as read from `trace_pipe_raw`.
    pub page_size: usize,
}

impl PageLayout {
    /// The layout of a 64-bit kernel with 4 KiB pages.
    pub const X86_64: PageLayout = PageLayout {
        commit_offset: 8,
        commit_size: 8,
        data_offset: 16,
        page_size: 4096,
    };

    /// Parses the text of `events/header_page`: the `commit` field's offset
    /// and size, and the `data` field's offset and size (their sum is the
    /// page size). `None` when a field is missing or the numbers make no
    /// page.
    pub fn parse(header_page: &str) -> Option<PageLayout> {
        let (commit_offset, commit_size) = field(header_page, "commit")?;
        let (data_offset, data_size) = field(header_page, "data")?;
        let page_size = data_offset.checked_add(data_size)?;
        let fits = matches!(commit_size, 4 | 8)
            && commit_offset + commit_size <= data_offset
            && data_offset < page_size
            && page_size <= 1 << 24;
        fits.then_some(PageLayout {
            commit_offset,
            commit_size,
            data_offset,
            page_size,
        })
    }
}

/// The offset and size of field `name` in a `header_page` text
/// (`field: local_t commit;\toffset:8;\tsize:8;\tsigned:1;`).
fn field(text: &str, name: &str) -> Option<(usize, usize)> {
    let line = text.lines().find(|l| {
        l.trim_start()
            .strip_prefix("field:")
            .and_then(|decl| decl.split(';').next())
            .and_then(|decl| decl.split_whitespace().last())
            == Some(name)
    })?;
    let number = |key: &str| -> Option<usize> {
        let rest = line.split(key).nth(1)?;
        rest.split(';').next()?.trim().parse().ok()
    };
    Some((number("offset:")?, number("size:")?))
}

/// One page from `trace_pipe_raw`: whether events were lost before it, and
/// its data records' payloads in order.
pub struct Page<'a> {
    /// The kernel flagged lost events before this page.
    pub missed: bool,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Page<'a> {
    /// Reads a page's header; `None` when `bytes` is shorter than the
    /// header. A `commit` beyond the page is clamped to it (the walk then
    /// stops at the first record that does not fit).
    pub fn new(bytes: &'a [u8], layout: &PageLayout) -> Option<Page<'a>> {
        let raw = bytes.get(layout.commit_offset..layout.commit_offset + layout.commit_size)?;
        let commit = match *raw {
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return None,
        };
        let data = bytes.get(layout.data_offset..)?;
        let len = usize::try_from(commit & COMMIT_LEN_MASK)
            .unwrap_or(usize::MAX)
            .min(data.len());
        Some(Page {
            missed: commit & (MISSED_EVENTS | MISSED_STORED) != 0,
            data: &data[..len],
            pos: 0,
        })
    }
}

impl<'a> Iterator for Page<'a> {
    /// A data record's payload: the event's fields, `common_type` first.
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            let at = self.pos;
            let header = u32_at(self.data, at)?;
            let type_len = header & 31;
            let time_delta = header >> 5;
            let (skip, payload) = match type_len {
                TYPE_PADDING if time_delta == 0 => return self.stop(),
                TYPE_PADDING => (
                    4usize.checked_add(u32_at(self.data, at + 4)? as usize)?,
                    None,
                ),
                TYPE_TIME_EXTEND | TYPE_TIME_STAMP => (8, None),
                0 => {
                    let len = u32_at(self.data, at + 4)? as usize;
                    if len < 4 {
                        return self.stop();
                    }
                    (4 + len, Some(at + 8..at + 4 + len))
                }
                n => {
                    let len = n as usize * 4;
                    (4 + len, Some(at + 4..at + 4 + len))
                }
            };
            let end = at.checked_add(skip)?;
            if end > self.data.len() {
                return self.stop();
            }
            self.pos = end;
            if let Some(range) = payload {
                return self.data.get(range);
            }
        }
    }
}

impl Page<'_> {
    /// Ends the walk (the rest of the page is empty or malformed).
    fn stop<T>(&mut self) -> Option<T> {
        self.pos = self.data.len();
        None
    }
}

/// The little-endian u32 at `at`, if the bytes hold one.
pub(crate) fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEADER_PAGE: &str = include_str!("../../../tests/fixtures/tracefs/header_page");

    #[test]
    fn header_page_of_this_kernel() {
        assert_eq!(PageLayout::parse(HEADER_PAGE), Some(PageLayout::X86_64));
        assert_eq!(PageLayout::parse("nonsense"), None);
    }

    /// A page by hand: header, a small record, a time extend, a discarded
    /// event (padding), a long record (type_len 0), then the null padding.
    #[test]
    fn hand_built_page() {
        let mut p = vec![0u8; 4096];
        let mut data = Vec::new();
        data.extend_from_slice(&(3u32 | (7 << 5)).to_le_bytes()); // 12 bytes
        data.extend_from_slice(&[1; 12]);
        data.extend_from_slice(&(30u32 | (5 << 5)).to_le_bytes());
        data.extend_from_slice(&9u32.to_le_bytes());
        data.extend_from_slice(&(29u32 | (1 << 5)).to_le_bytes());
        data.extend_from_slice(&12u32.to_le_bytes()); // counts itself
        data.extend_from_slice(&[0xEE; 8]);
        data.extend_from_slice(&0u32.to_le_bytes());
        data.extend_from_slice(&(4u32 + 120).to_le_bytes());
        data.extend_from_slice(&[2; 120]);
        data.extend_from_slice(&31u32.to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        let commit = data.len() as u64 + 4; // the null padding word
        data.extend_from_slice(&29u32.to_le_bytes());
        p[8..16].copy_from_slice(&(commit | MISSED_EVENTS).to_le_bytes());
        p[16..16 + data.len()].copy_from_slice(&data);
        let page = Page::new(&p, &PageLayout::X86_64).unwrap();
        assert!(page.missed);
        let records: Vec<&[u8]> = page.collect();
        assert_eq!(records, vec![&[1u8; 12][..], &[2u8; 120][..]]);
    }

    proptest! {
        #[test]
        fn random_pages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4200),
                                    commit in any::<u64>()) {
            let mut bytes = bytes;
            if bytes.len() >= 16 {
                bytes[8..16].copy_from_slice(&(commit % 8192).to_le_bytes());
            }
            if let Some(page) = Page::new(&bytes, &PageLayout::X86_64) {
                for record in page {
                    prop_assert!(record.len() <= bytes.len());
                }
            }
        }

        #[test]
        fn random_header_pages_never_panic(text in ".{0,300}") {
            let _ = PageLayout::parse(&text);
        }
    }
}
