//! One line of input, read with a bound on the bytes kept: its head (or, for a sentence whose
//! left end is cut, its tail), the rest streamed past and checked for UTF-8.

use std::io::BufRead;

/// What a line reader ([`read_line_bounded`], [`read_line_tail`]) read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct LineRead {
    /// Bytes consumed, line ending included; 0 at the end of the input.
    pub bytes: u64,
    /// True when the line's text (its ending aside) was longer than the limit and only its
    /// head (or tail) was kept.
    pub clipped: bool,
    /// 1-based byte column of the first invalid UTF-8 byte in the part that was not kept (and,
    /// from [`read_line_tail`] on a cut line, in the part kept too, whose columns the line's
    /// decoding would count from the cut).
    pub bad_utf8_at: Option<u64>,
}

/// Reads one line into `buf`, keeping at most `keep` bytes of it (cut back to a character
/// boundary) and streaming past the rest while checking that it is UTF-8. The line counts as
/// cut only when its text, the line ending aside, is longer than `keep`.
pub(super) fn read_line_bounded(
    r: &mut dyn BufRead,
    keep: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
    let mut res = LineRead::default();
    // Whether bytes past `keep` came (the text was cut unless they are only the line ending).
    let mut past = false;
    // The line's last two bytes so far, for its ending.
    let mut last = [0u8; 2];
    // Bytes of a character split across the kept part or a chunk boundary.
    let mut carry: Vec<u8> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    loop {
        let (chunk, done) = piece(r)?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        last = match n {
            1 => [last[1], chunk[0]],
            _ => [chunk[n - 2], chunk[n - 1]],
        };
        let room = keep.saturating_sub(buf.len());
        let tail: &[u8] = if past {
            chunk
        } else if n <= room {
            buf.extend_from_slice(chunk);
            &[]
        } else {
            buf.extend_from_slice(&chunk[..room]);
            past = true;
            // Cut the kept part back to a character boundary; the cut bytes start the tail.
            let cut = match std::str::from_utf8(buf) {
                Ok(_) => buf.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                // Invalid bytes in the kept part are reported after the loop.
                Err(_) => buf.len(),
            };
            carry.extend_from_slice(&buf[cut..]);
            buf.truncate(cut);
            &chunk[room..]
        };
        if past && res.bad_utf8_at.is_none() {
            let before = res.bytes + (n - tail.len()) as u64 - carry.len() as u64;
            scratch.clear();
            scratch.extend_from_slice(&carry);
            scratch.extend_from_slice(tail);
            carry.clear();
            match std::str::from_utf8(&scratch) {
                Ok(_) => {}
                Err(e) if e.error_len().is_none() => {
                    carry.extend_from_slice(&scratch[e.valid_up_to()..])
                }
                Err(e) => res.bad_utf8_at = Some(before + e.valid_up_to() as u64 + 1),
            }
        }
        res.bytes += n as u64;
        r.consume(n);
        if done {
            break;
        }
    }
    if !carry.is_empty() && res.bad_utf8_at.is_none() {
        res.bad_utf8_at = Some(res.bytes - carry.len() as u64 + 1);
    }
    // An invalid byte in the kept head comes before any found in the rest.
    if past {
        if let Err(e) = std::str::from_utf8(buf) {
            res.bad_utf8_at = Some(e.valid_up_to() as u64 + 1);
        }
    }
    res.clipped = past && res.bytes - ending(&last) as u64 > keep as u64;
    Ok(res)
}

/// The reader's next bytes, up to and including a newline, and whether they end the line;
/// empty at the end of the input.
fn piece(r: &mut dyn BufRead) -> std::io::Result<(&[u8], bool)> {
    // Interrupted reads are retried; the buffer is then borrowed once more, to return it
    // (without reading: it holds the bytes). The end of the input is not read twice (a
    // terminal gives one end per Ctrl-D).
    loop {
        match r.fill_buf() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok([]) => return Ok((&[], false)),
            Ok(_) => break,
        }
    }
    let avail = r.fill_buf()?;
    Ok(match avail.iter().position(|&b| b == b'\n') {
        Some(i) => (&avail[..=i], true),
        None => (avail, false),
    })
}

/// Bytes of the line ending that `bytes` (a line's last bytes) end with: 2 for "\r\n", 1 for
/// "\n", 0 at the end of the input without one. The bounds count a line's text, not its ending.
fn ending(bytes: &[u8]) -> usize {
    match (bytes.ends_with(b"\r\n"), bytes.ends_with(b"\n")) {
        (true, _) => 2,
        (false, true) => 1,
        (false, false) => 0,
    }
}

/// Reads one line into `buf`, keeping at most the last `keep` bytes of its text (from a
/// character boundary) and its line ending. The bytes dropped from its front are checked for
/// UTF-8 as they go, and `buf` never holds more than `2 * keep + 2` bytes and a chunk of the
/// reader.
pub(super) fn read_line_tail(
    r: &mut dyn BufRead,
    keep: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
    let mut res = LineRead::default();
    // Bytes dropped from the line's front so far.
    let mut dropped = 0u64;
    loop {
        let (chunk, done) = piece(r)?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        if buf.len() + n > buf.capacity() && buf.len() + n > keep {
            // One allocation for a long line: the bound, a line ending and a chunk.
            buf.reserve_exact(2 * keep + 2 + n.max(1 << 16) - buf.len());
        }
        buf.extend_from_slice(chunk);
        res.bytes += n as u64;
        r.consume(n);
        // Room is left for a line ending (2 bytes) beyond the kept text.
        if buf.len() > 2 * keep + 2 {
            dropped += drop_front(buf, buf.len() - keep - 2, dropped, &mut res);
        }
        if done {
            break;
        }
    }
    let end = ending(buf);
    if buf.len() > keep + end {
        dropped += drop_front(buf, buf.len() - keep - end, dropped, &mut res);
    }
    if res.clipped && res.bad_utf8_at.is_none() {
        if let Err(e) = std::str::from_utf8(buf) {
            res.bad_utf8_at = Some(dropped + e.valid_up_to() as u64 + 1);
        }
    }
    Ok(res)
}

/// Drops `buf`'s first `n` bytes and the continuation bytes right after them (so that the
/// kept part starts a character), marks the line cut, and records the first invalid UTF-8 byte
/// of those dropped (`before` bytes of the line were dropped earlier). Returns the bytes
/// dropped.
fn drop_front(buf: &mut Vec<u8>, n: usize, before: u64, res: &mut LineRead) -> u64 {
    let mut d = n;
    while d < buf.len() && buf[d] & 0xc0 == 0x80 {
        d += 1;
    }
    if res.bad_utf8_at.is_none() {
        if let Err(e) = std::str::from_utf8(&buf[..d]) {
            res.bad_utf8_at = Some(before + e.valid_up_to() as u64 + 1);
        }
    }
    buf.drain(..d);
    res.clipped = true;
    d as u64
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    type Read = fn(&mut dyn BufRead, usize, &mut Vec<u8>) -> std::io::Result<LineRead>;

    fn read_all_lines(data: &[u8], keep: usize) -> Vec<(Vec<u8>, LineRead)> {
        read_all_with(read_line_bounded, data, keep)
    }

    /// Every line of `data` through `read`, from a reader that hands out 7 bytes at a time.
    fn read_all_with(read: Read, data: &[u8], keep: usize) -> Vec<(Vec<u8>, LineRead)> {
        read_all_in(7, read, data, keep)
    }

    /// As [`read_all_with`], `size` bytes at a time.
    fn read_all_in(size: usize, read: Read, data: &[u8], keep: usize) -> Vec<(Vec<u8>, LineRead)> {
        let mut r = BufReader::with_capacity(size, data);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let l = read(&mut r, keep, &mut buf).unwrap();
            if l.bytes == 0 {
                return out;
            }
            out.push((buf, l));
        }
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary_and_still_checked() {
        let text = "héllo wörld\nshort\n".as_bytes();
        let lines = read_all_lines(text, 3);
        assert_eq!(lines.len(), 2);
        // "hé" is 3 bytes: h + 2-byte é.
        assert_eq!(lines[0].0, "hé".as_bytes());
        assert!(lines[0].1.clipped);
        assert_eq!(lines[0].1.bad_utf8_at, None);
        assert_eq!(lines[0].1.bytes, "héllo wörld\n".len() as u64);
        assert_eq!(lines[1].0, b"sho");
        // "h" + the first byte of é: the cut falls inside the character.
        let lines = read_all_lines(text, 2);
        assert_eq!(lines[0].0, b"h");
        assert_eq!(lines[0].1.bad_utf8_at, None);
        // An invalid byte far beyond the kept part is still found, at its column.
        let mut bad = vec![b'a'; 40];
        bad[30] = 0xff;
        bad.push(b'\n');
        let lines = read_all_lines(&bad, 4);
        assert_eq!(lines[0].1.bad_utf8_at, Some(31));
        // A character cut off by the end of the input is invalid too.
        let lines = read_all_lines(&[b'a', b'b', b'c', 0xc3], 2);
        assert_eq!(lines[0].1.bad_utf8_at, Some(4));
        // An invalid byte in the kept head is the one named, before one past it.
        let mut bad = vec![b'a'; 40];
        (bad[1], bad[30]) = (0xff, 0xff);
        let lines = read_all_lines(&bad, 4);
        assert_eq!(lines[0].1.bad_utf8_at, Some(2));
        // Short lines are kept whole.
        let lines = read_all_lines(b"abc\r\n", 100);
        assert_eq!(lines[0].0, b"abc\r\n");
        assert!(!lines[0].1.clipped);
    }

    #[test]
    fn long_lines_keep_their_tail_from_a_character_boundary() {
        let text = "wörld héllo\nshort\nab\n".as_bytes();
        let lines = read_all_with(read_line_tail, text, 6);
        assert_eq!(lines.len(), 3);
        // The last 6 bytes of text are "héllo" (é is 2 bytes); the line ending is kept.
        assert_eq!(lines[0].0, "héllo\n".as_bytes());
        assert!(lines[0].1.clipped);
        assert_eq!(lines[0].1.bytes, "wörld héllo\n".len() as u64);
        assert_eq!(lines[0].1.bad_utf8_at, None);
        // The next lines are read whole after a cut one.
        assert_eq!(lines[1].0, b"short\n");
        assert!(!lines[1].1.clipped);
        assert_eq!(lines[2].0, b"ab\n");
        let lines = read_all_with(read_line_tail, text, 5);
        assert_eq!(lines[0].0, "éllo\n".as_bytes());
        // 4 bytes start inside é: its second byte goes too.
        let lines = read_all_with(read_line_tail, text, 4);
        assert_eq!(lines[0].0, b"llo\n");
        // A line many times the bound, read 7 bytes at a time, keeps exactly its end.
        let long: String = (0..500).map(|i| format!("w{i} ")).collect();
        let lines = read_all_with(read_line_tail, format!("{long}\r\n").as_bytes(), 20);
        let want = format!("{}\r\n", &long[long.len() - 20..]);
        assert_eq!(lines[0].0, want.as_bytes());
    }

    /// The bound counts a line's text, not its ending: a line of exactly `keep` bytes of text
    /// is whole, from either end.
    #[test]
    fn the_bound_counts_text_not_the_line_ending() {
        for (read, cut) in [
            (read_line_bounded as Read, &b"abcd"[..]),
            (read_line_tail, b"bcde\n"),
        ] {
            for line in ["abcd\n", "abcd\r\n", "abcd"] {
                // Read 7 bytes at a time, and 5 ("\r\n" split across two reads).
                for lines in [
                    read_all_with(read, line.as_bytes(), 4),
                    read_all_in(5, read, line.as_bytes(), 4),
                ] {
                    assert_eq!(text(&lines[0].0), b"abcd", "{line:?}");
                    assert!(!lines[0].1.clipped, "{line:?}");
                    assert_eq!(lines[0].1.bytes, line.len() as u64);
                }
            }
            let lines = read_all_with(read, b"abcde\n", 4);
            assert!(lines[0].1.clipped);
            assert_eq!(lines[0].0, cut);
        }
    }

    #[test]
    fn a_cut_tail_still_checks_every_byte_at_its_column() {
        // An invalid byte in the dropped front, at its column in the line.
        let mut bad = vec![b'a'; 40];
        bad[3] = 0xff;
        bad.push(b'\n');
        let lines = read_all_with(read_line_tail, &bad, 4);
        assert_eq!(lines[0].1.bad_utf8_at, Some(4));
        assert_eq!(lines[0].0, b"aaaa\n");
        // Dropped after earlier drops: its column counts those too.
        let mut bad = vec![b'a'; 40];
        bad[20] = 0xff;
        bad.push(b'\n');
        let lines = read_all_with(read_line_tail, &bad, 4);
        assert_eq!(lines[0].1.bad_utf8_at, Some(21));
        // In the kept tail: its column in the line, not in the tail.
        let mut bad = vec![b'a'; 40];
        bad[38] = 0xff;
        bad.push(b'\n');
        let lines = read_all_with(read_line_tail, &bad, 4);
        assert_eq!(lines[0].1.bad_utf8_at, Some(39));
        // A character cut off by the end of the input.
        let lines = read_all_with(read_line_tail, &[b'a', b'b', b'c', b'd', 0xc3], 3);
        assert_eq!(lines[0].1.bad_utf8_at, Some(5));
        // Short lines are kept whole and left to the decoding.
        let lines = read_all_with(read_line_tail, b"abc\r\n", 100);
        assert_eq!(lines[0].0, b"abc\r\n");
        assert_eq!(
            lines[0].1,
            LineRead {
                bytes: 5,
                clipped: false,
                bad_utf8_at: None
            }
        );
    }

    /// A line's text: its bytes without the line ending.
    fn text(line: &[u8]) -> &[u8] {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        line.strip_suffix(b"\r").unwrap_or(line)
    }

    /// A terminal: each read hands out its next part, an empty part being one end of input
    /// (Ctrl-D), after which more may come.
    struct Terminal(std::collections::VecDeque<&'static [u8]>);

    impl std::io::Read for Terminal {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let part = self.0.pop_front().unwrap_or(b"");
            out[..part.len()].copy_from_slice(part);
            Ok(part.len())
        }
    }

    /// One end of input ends the reading: the end is not read twice.
    #[test]
    fn one_end_of_input_is_enough() {
        for read in [read_line_bounded as Read, read_line_tail] {
            let parts = [&b"a\n"[..], b"", b"more\n"].into_iter().collect();
            let mut r = BufReader::new(Terminal(parts));
            let mut buf = Vec::new();
            assert_eq!(read(&mut r, 100, &mut buf).unwrap().bytes, 2);
            buf.clear();
            let end = read(&mut r, 100, &mut buf).unwrap();
            assert_eq!((end.bytes, buf.len()), (0, 0), "read past the end");
        }
    }
}
