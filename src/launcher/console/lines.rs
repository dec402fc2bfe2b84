//! Guest console bytes to clean text lines (pure): what a terminal would show on each line, without ANSI
//! escapes, `\r` or other control characters, and a rate limit for logging them.
//!
//! The console is a terminal, not a log: SeaBIOS clears the screen with escapes, iPXE erases its "Press
//! Ctrl-B" prompt with backspaces and redraws progress lines after `\r`. [`LineAssembler`] plays each line
//! onto a one-line screen (a carriage return goes back to column 0, a backspace one column left, printable
//! characters overwrite), drops escape sequences and control characters, and hands out the visible text when
//! a newline arrives.
//!
//! Under SeaBIOS's serial console (`-machine graphics=off`) firmware and iPXE output is wrapped at 80
//! columns with a real line break. While `join_wrapped` is on (firmware and iPXE stages), a line that filled
//! all 80 columns is joined with the next one, so an iPXE error such as `... (http://ipxe.org/2d0c613b)` is
//! one line again. A Linux kernel writes to the UART directly, so the launcher turns joining off from the
//! kernel stage on.

use std::time::{Duration, Instant};

/// The width at which SeaBIOS's serial console wraps.
pub(crate) const WRAP_COLUMNS: usize = 80;
/// A line longer than this is handed out in pieces (a guest that never sends a newline).
pub(crate) const MAX_LINE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Esc {
    /// Plain text.
    None,
    /// After ESC.
    Start,
    /// In a CSI sequence (`ESC [` ... final byte 0x40-0x7e).
    Csi,
    /// In an OSC/DCS/APC/PM/SOS string (ended by BEL or `ESC \`).
    Str,
    /// ESC inside a string: a `\` ends it.
    StrEnd,
    /// After `ESC (`, `ESC )` and the like: one more byte.
    Charset,
}

/// What the assembler hands out, in console order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A complete clean line.
    Line(String),
    /// The terminal was reset (`ESC c`): SeaBIOS's serial console sends it when a video mode is set, at
    /// power-on and when a Linux kernel's real-mode setup code takes over from the boot loader. Whatever was
    /// on the unfinished line has been handed out as a line of its own just before.
    ScreenReset,
}

/// Assembles clean lines from raw console bytes. Invalid UTF-8 becomes U+FFFD.
#[derive(Debug)]
pub(crate) struct LineAssembler {
    /// The visible characters of the current line.
    screen: Vec<char>,
    cursor: usize,
    /// Pending bytes of an incomplete UTF-8 sequence.
    utf8: Vec<u8>,
    esc: Esc,
    /// A line that filled the width, waiting to be joined with the next one.
    wrapped: Option<String>,
    /// Join lines that filled [`WRAP_COLUMNS`] with the next line.
    pub join_wrapped: bool,
}

impl Default for LineAssembler {
    fn default() -> Self {
        LineAssembler {
            screen: Vec::new(),
            cursor: 0,
            utf8: Vec::new(),
            esc: Esc::None,
            wrapped: None,
            join_wrapped: true,
        }
    }
}

impl LineAssembler {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feed raw bytes; complete lines are passed to `out` (without the newline, trailing blanks trimmed).
    #[cfg(test)]
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut impl FnMut(String)) {
        self.push_pieces(bytes, &mut |p| {
            if let Piece::Line(l) = p {
                out(l);
            }
        });
    }

    /// Feed raw bytes; lines and terminal resets are passed to `out` in order.
    pub(crate) fn push_pieces(&mut self, bytes: &[u8], out: &mut impl FnMut(Piece)) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    /// The visible text of the unfinished line (iPXE's download progress, redrawn with backspaces), trailing
    /// blanks trimmed; empty while a wrapped line waits for its continuation.
    pub(crate) fn partial_text(&self) -> String {
        if self.wrapped.is_some() {
            return String::new();
        }
        self.screen.iter().collect::<String>().trim_end().to_owned()
    }

    /// What is on the current, unfinished line (and a wrapped line waiting for its continuation), handed out
    /// as a line of its own: for a guest that went quiet without a newline (a login prompt).
    pub(crate) fn flush(&mut self, out: &mut impl FnMut(String)) {
        self.flush_pieces(&mut |p| {
            if let Piece::Line(l) = p {
                out(l);
            }
        });
    }

    fn flush_pieces(&mut self, out: &mut impl FnMut(Piece)) {
        let pending = self.wrapped.take();
        let current: String = self.screen.iter().collect();
        self.screen.clear();
        self.cursor = 0;
        let line = match pending {
            Some(p) => p + &current,
            None => current,
        };
        let line = line.trim_end().to_owned();
        if !line.is_empty() {
            out(Piece::Line(line));
        }
    }

    /// Whether the unfinished line looks like a prompt waiting for input (`login: `, `# `, `Password:`,
    /// `[y/N]? `): it ends in `:`, `#`, `$`, `>` or `?`, perhaps followed by blanks. Progress output that is
    /// still growing (`Configuring (net0 ...)....`) does not, so it is not cut in two.
    pub(crate) fn partial_is_prompt(&self) -> bool {
        self.wrapped.is_none()
            && self
                .screen
                .iter()
                .rev()
                .find(|c| !c.is_whitespace())
                .is_some_and(|c| matches!(c, ':' | '#' | '$' | '>' | '?'))
    }

    fn byte(&mut self, b: u8, out: &mut impl FnMut(Piece)) {
        match self.esc {
            Esc::None => {}
            Esc::Start => {
                self.esc = match b {
                    b'[' => Esc::Csi,
                    b']' | b'P' | b'X' | b'^' | b'_' => Esc::Str,
                    b'(' | b')' | b'*' | b'+' | b'#' | b'%' => Esc::Charset,
                    // `ESC c`, a full reset: a new screen. What was on the unfinished line (SeaBIOS's
                    // `Probing EDD ... o` before a kernel's first line) goes as a line of its own.
                    b'c' => {
                        self.esc = Esc::None;
                        self.flush_pieces(out);
                        out(Piece::ScreenReset);
                        return;
                    }
                    // A two-byte sequence such as `ESC c` (reset) or `ESC 7`.
                    _ => Esc::None,
                };
                return;
            }
            Esc::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.esc = Esc::None;
                } else if !(0x20..0x40).contains(&b) {
                    // Not a CSI byte: the sequence is broken; treat this byte as text.
                    self.esc = Esc::None;
                    self.byte(b, out);
                }
                return;
            }
            Esc::Str => {
                match b {
                    0x07 => self.esc = Esc::None,
                    0x1b => self.esc = Esc::StrEnd,
                    _ => {}
                }
                return;
            }
            Esc::StrEnd => {
                self.esc = if b == b'\\' { Esc::None } else { Esc::Str };
                return;
            }
            Esc::Charset => {
                self.esc = Esc::None;
                return;
            }
        }
        match b {
            0x1b => {
                self.utf8.clear();
                self.esc = Esc::Start;
            }
            b'\n' => self.newline(out),
            b'\r' => self.cursor = 0,
            0x08 => self.cursor = self.cursor.saturating_sub(1),
            b'\t' => {
                let next = (self.cursor / 8 + 1) * 8;
                while self.cursor < next {
                    self.put(' ');
                }
            }
            0x00..=0x1f | 0x7f => {}
            0x20..=0x7e => self.put(b as char),
            _ => {
                self.utf8.push(b);
                match std::str::from_utf8(&self.utf8) {
                    Ok(s) => {
                        let chars: Vec<char> = s.chars().collect();
                        self.utf8.clear();
                        for c in chars {
                            if !c.is_control() {
                                self.put(c);
                            }
                        }
                    }
                    Err(e) if e.error_len().is_some() || self.utf8.len() >= 4 => {
                        self.utf8.clear();
                        self.put(char::REPLACEMENT_CHARACTER);
                    }
                    Err(_) => {}
                }
            }
        }
        if self.screen.len() >= MAX_LINE {
            self.newline(out);
        }
    }

    fn put(&mut self, c: char) {
        if self.cursor < self.screen.len() {
            self.screen[self.cursor] = c;
        } else {
            self.screen.push(c);
        }
        self.cursor += 1;
    }

    fn newline(&mut self, out: &mut impl FnMut(Piece)) {
        let text: String = self.screen.iter().collect();
        let full = self.screen.len() == WRAP_COLUMNS;
        self.screen.clear();
        self.cursor = 0;
        self.utf8.clear();
        let line = match self.wrapped.take() {
            Some(p) => p + &text,
            None => text,
        };
        if self.join_wrapped && full && line.len() < MAX_LINE {
            self.wrapped = Some(line);
            return;
        }
        out(Piece::Line(line.trim_end().to_owned()));
    }
}

/// A token bucket for guest lines in the log: `burst` lines at once, `per_sec` on average after that. Lines
/// over the limit are left out. A suppression episode begins with the first line left out and ends once
/// none has been left out for a quiet spell; it then gets one summary (how many, over how long), so the
/// summaries never add to the rate.
#[derive(Debug)]
pub(crate) struct RateLimit {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    episode: Option<Episode>,
}

/// Lines left out since `first`, the latest at `last`.
#[derive(Debug, Clone, Copy)]
struct Episode {
    first: Instant,
    last: Instant,
    suppressed: u64,
}

/// One suppression episode, ended: `suppressed` lines left out over `secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    pub(crate) suppressed: u64,
    pub(crate) secs: f64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Log,
    /// Leave it out (counted in the episode).
    Drop,
}

impl RateLimit {
    pub(crate) fn new(burst: u32, per_sec: u32) -> Self {
        RateLimit {
            burst: f64::from(burst),
            per_sec: f64::from(per_sec),
            tokens: f64::from(burst),
            last: Instant::now(),
            episode: None,
        }
    }

    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Verdict::Log
        } else {
            let ep = self.episode.get_or_insert(Episode { first: now, last: now, suppressed: 0 });
            ep.suppressed += 1;
            ep.last = now;
            Verdict::Drop
        }
    }

    /// The summary of the episode, once no line has been left out for `quiet`.
    pub(crate) fn ended(&mut self, now: Instant, quiet: Duration) -> Option<Summary> {
        let ep = self.episode?;
        (now.saturating_duration_since(ep.last) >= quiet).then(|| self.take(ep))
    }

    /// The summary of the episode in progress, if any (the console ended).
    pub(crate) fn finish(&mut self) -> Option<Summary> {
        let ep = self.episode?;
        Some(self.take(ep))
    }

    fn take(&mut self, ep: Episode) -> Summary {
        self.episode = None;
        Summary { suppressed: ep.suppressed, secs: ep.last.saturating_duration_since(ep.first).as_secs_f64() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether anything is waiting for a newline.
    fn has_partial(a: &LineAssembler) -> bool {
        a.wrapped.is_some() || a.screen.iter().any(|c| !c.is_whitespace())
    }

    fn lines(bytes: &[u8]) -> Vec<String> {
        let mut a = LineAssembler::new();
        let mut v = Vec::new();
        a.push(bytes, &mut |l| v.push(l));
        v
    }

    #[test]
    fn escapes_and_carriage_returns_are_removed() {
        // SeaBIOS's first bytes, as they arrive.
        let v = lines(b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n");
        assert_eq!(v, ["SeaBIOS (version 1.16.2-debian-1.16.2-1)"]);
        let v = lines(b"\x1b[0;1miPXE 1.0.0\x1b[0m -- Open Source\r\n");
        assert_eq!(v, ["iPXE 1.0.0 -- Open Source"]);
        // An OSC title, a charset switch, stray controls.
        let v = lines(b"\x1b]0;title\x07a\x1b(Bb\x00\x07c\x1b]2;x\x1b\\d\r\n");
        assert_eq!(v, ["abcd"]);
        for l in lines(b"\x1b[31mred\x1b[0m\r\n\x1b[K\r\n") {
            assert!(!l.contains('\x1b') && !l.contains('\r'), "{l:?}");
        }
    }

    #[test]
    fn the_line_shows_what_a_terminal_shows() {
        // iPXE erases its prompt with backspaces, then prints on the same line.
        let mut raw = b"Press Ctrl-B for the iPXE command line...".to_vec();
        for _ in 0..41 {
            raw.extend_from_slice(b"\x08 \x08");
        }
        raw.extend_from_slice(b"net0: 52:54:00:12:34:56 using virtio-net on 0000:00:03.0 (open)\r\n");
        assert_eq!(lines(&raw), ["net0: 52:54:00:12:34:56 using virtio-net on 0000:00:03.0 (open)"]);
        // A progress line redrawn after \r.
        assert_eq!(lines(b"Loading... 10%\rLoading... 100%\r\n"), ["Loading... 100%"]);
        // Blanked with spaces: nothing left.
        assert_eq!(lines(b"Press Ctrl-B\r            \r\n"), [""]);
        assert_eq!(lines(b"a\tb\n"), ["a       b"]);
    }

    #[test]
    fn lines_wrapped_at_80_columns_are_joined_until_turned_off() {
        let first = "http://10.0.2.2:18081/missing.ipxe... No such file or directory (http://ipxe.org";
        assert_eq!(first.len(), 80);
        let raw = format!("{first}\r\n/2d0c613b)\r\nnext\r\n");
        assert_eq!(lines(raw.as_bytes()), [format!("{first}/2d0c613b)"), "next".into()]);
        let mut a = LineAssembler::new();
        a.join_wrapped = false;
        let mut v = Vec::new();
        a.push(raw.as_bytes(), &mut |l| v.push(l));
        assert_eq!(v, [first, "/2d0c613b)", "next"]);
    }

    #[test]
    fn utf8_split_across_pushes_and_invalid_bytes() {
        let mut a = LineAssembler::new();
        let mut v = Vec::new();
        let s = "größe €\n".as_bytes();
        for chunk in s.chunks(1) {
            a.push(chunk, &mut |l| v.push(l));
        }
        a.push(b"\xff\xfeok\n", &mut |l| v.push(l));
        assert_eq!(v, ["größe €", "\u{fffd}\u{fffd}ok"]);
    }

    #[test]
    fn endless_lines_come_out_in_pieces_and_flush_hands_out_a_prompt() {
        let mut a = LineAssembler::new();
        let mut v = Vec::new();
        a.push(&vec![b'x'; MAX_LINE * 2 + 10], &mut |l| v.push(l));
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|l| l.len() == MAX_LINE));
        assert!(has_partial(&a));
        let mut rest = Vec::new();
        a.flush(&mut |l| rest.push(l));
        assert_eq!(rest, ["x".repeat(10)]);
        a.push(b"Configuring (net0 52:54:00:12:34:56)....", &mut |l| rest.push(l));
        assert!(has_partial(&a) && !a.partial_is_prompt(), "progress is not a prompt");
        a.push(b" ok\r\nlogin: ", &mut |l| rest.push(l));
        assert!(a.partial_is_prompt());
        a.flush(&mut |l| rest.push(l));
        assert_eq!(rest[rest.len() - 2..], ["Configuring (net0 52:54:00:12:34:56).... ok", "login:"]);
        assert!(!has_partial(&a));
    }

    #[test]
    fn rate_limit_counts_what_it_leaves_out() {
        let t0 = Instant::now();
        let quiet = Duration::from_secs(1);
        let mut r = RateLimit::new(3, 10);
        for _ in 0..3 {
            assert_eq!(r.check(t0), Verdict::Log);
        }
        assert_eq!(r.check(t0), Verdict::Drop);
        assert_eq!(r.check(t0), Verdict::Drop);
        // 100 ms later one token is back: logged, and no note yet (the episode goes on).
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.check(t1), Verdict::Log);
        assert_eq!(r.check(t1), Verdict::Drop);
        assert_eq!(r.ended(t1 + Duration::from_millis(500), quiet), None);
        assert_eq!(r.ended(t1 + quiet, quiet), Some(Summary { suppressed: 3, secs: 0.1 }));
        assert_eq!(r.ended(t1 + quiet * 2, quiet), None, "one summary per episode");
        assert_eq!(r.finish(), None);
    }

    /// A flood of 100 lines/s for 60 s: 200 at once, then 50/s, and one summary with the rest.
    #[test]
    fn a_long_flood_is_200_then_50_per_second_with_one_summary() {
        let t0 = Instant::now();
        let quiet = Duration::from_secs(1);
        let mut r = RateLimit::new(200, 50);
        let (mut logged, mut summaries) = (0u64, Vec::new());
        for i in 0..6000u64 {
            let now = t0 + Duration::from_millis(i * 10);
            summaries.extend(r.ended(now, quiet));
            if r.check(now) == Verdict::Log {
                logged += 1;
            }
        }
        summaries.extend(r.ended(t0 + Duration::from_secs(62), quiet));
        assert!((3190..=3210).contains(&logged), "{logged}");
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].suppressed + logged, 6000);
        assert!(summaries[0].secs > 55.0, "{:?}", summaries[0]);
    }

    #[test]
    fn a_kernel_burst_is_one_suppression_episode() {
        // 2000 lines at 500 per second (a kernel boot under TCG), then quiet: one summary with the total.
        let t0 = Instant::now();
        let quiet = Duration::from_secs(1);
        let mut r = RateLimit::new(200, 50);
        let (mut logged, mut notes, mut dropped) = (0u64, Vec::new(), 0u64);
        for i in 0..2000u64 {
            let now = t0 + Duration::from_millis(i * 2);
            notes.extend(r.ended(now, quiet));
            match r.check(now) {
                Verdict::Log => logged += 1,
                Verdict::Drop => dropped += 1,
            }
        }
        assert!(notes.is_empty(), "notes during the burst: {notes:?}");
        let s = r.ended(t0 + Duration::from_secs(6), quiet).unwrap();
        assert_eq!(s.suppressed, dropped);
        assert_eq!(logged + s.suppressed, 2000);
        // A line after the episode carries no old count.
        assert_eq!(r.check(t0 + Duration::from_secs(7)), Verdict::Log);
        assert_eq!(r.finish(), None);
    }

    /// A terminal reset (`ESC c`) ends the unfinished line (SeaBIOS's `Probing EDD ... o` before a kernel's
    /// first line) and is handed out in order.
    #[test]
    fn a_screen_reset_splits_firmware_leftovers_from_the_kernel() {
        let mut a = LineAssembler::new();
        let mut v = Vec::new();
        a.push_pieces(
            b"initrd.img... ok\r\nProbing EDD (edd=off to disable)... o\x1bc\x1b[?7l\x1b[2J[    0.000000] Linux version 6.1.0\r\n",
            &mut |p| v.push(p),
        );
        assert_eq!(
            v,
            [
                Piece::Line("initrd.img... ok".into()),
                Piece::Line("Probing EDD (edd=off to disable)... o".into()),
                Piece::ScreenReset,
                Piece::Line("[    0.000000] Linux version 6.1.0".into()),
            ]
        );
        // With `quiet`: the reset straight after iPXE's last line, nothing before it.
        let mut v = Vec::new();
        a.push_pieces(b"\x1bc\x1b[?7l\x1b[2Jec-guest: init started\r\n", &mut |p| v.push(p));
        assert_eq!(v, [Piece::ScreenReset, Piece::Line("ec-guest: init started".into())]);
    }

    /// iPXE's progress as the unfinished line shows it, percentages erased with backspaces.
    #[test]
    fn partial_text_follows_ipxe_progress() {
        let mut a = LineAssembler::new();
        let mut v = Vec::new();
        a.push(b"vmlinuz... ok\r\ninitrd.img... 19%", &mut |l| v.push(l));
        assert_eq!(a.partial_text(), "initrd.img... 19%");
        a.push(b"\x08\x08\x08\x08    \x08\x08\x08\x08 43%", &mut |l| v.push(l));
        assert_eq!(a.partial_text(), "initrd.img... 43%");
        a.push(b"\x08\x08\x08\x08    \x08\x08\x08\x08 ok\r\n", &mut |l| v.push(l));
        assert_eq!(v, ["vmlinuz... ok", "initrd.img... ok"]);
        assert_eq!(a.partial_text(), "");
    }

    /// After the firmware (joining off), a guest line of exactly 80 columns stays its own line.
    #[test]
    fn eighty_columns_stay_a_line_once_joining_is_off() {
        let line80 = format!("ec-guest: {}", "0".repeat(70));
        let mut a = LineAssembler::new();
        a.join_wrapped = false;
        let mut v = Vec::new();
        a.push(format!("{line80}\r\nec-publisher: ready\r\n").as_bytes(), &mut |l| v.push(l));
        assert_eq!(v, [line80.as_str(), "ec-publisher: ready"]);
    }
}
