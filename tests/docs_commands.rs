//! The documentation against the binaries it describes (no root needed).
//!
//! README.md and every `docs/*.md` are read:
//! - every `ec-macvtap SUB` and `ec-ipxe-qemu SUB` named anywhere (prose, code blocks, unit files) must be a
//!   subcommand: `BINARY SUB --help` of the built binary must succeed;
//! - on command lines (```` ```sh ```` blocks, `Exec...=` lines of ```` ```ini ```` units, `$ ` prompt lines of
//!   any code block), every `--flag` after the subcommand (continuation lines joined; up to `--`, a pipe, `;`,
//!   `&&`, `||`, a comment or the end of a `$(...)`) must appear in that subcommand's `--help` (a flag before
//!   the subcommand: in `BINARY --help`);
//! - every subcommand the binaries list in `--help` is named somewhere in the documentation;
//! - every relative link (`](docs/...)`, `](../README.md)`, `](other.md#anchor)`, `](#anchor)`) names a file
//!   that exists and, with an anchor into a Markdown file, a heading of that file (GitHub's anchor rules).
//!
//! Failures name the file and line, all of them at once.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BINARIES: [(&str, &str); 2] =
    [("ec-macvtap", env!("CARGO_BIN_EXE_ec-macvtap")), ("ec-ipxe-qemu", env!("CARGO_BIN_EXE_ec-ipxe-qemu"))];

/// Global options that take a value (`ec-macvtap --netns NAME SUB`).
const GLOBAL_WITH_VALUE: [&str; 1] = ["--netns"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and docs/*.md, as (path relative to the repository, text).
fn documents() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_owned()];
    let mut pages: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("docs/ entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "docs/ has no .md page");
    names.extend(pages);
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(repo().join(&n)).unwrap_or_else(|e| panic!("read {n}: {e}"));
            (n, text)
        })
        .collect()
}

/// One logical line of a document: its first line number, its text, whether it is a command line (in a
/// ```sh block, an `Exec...=` line of an ```ini block, or a `$ ` prompt line of any code block), and whether it
/// is in a code block at all.
struct Line {
    number: usize,
    text: String,
    command: bool,
    in_code: bool,
}

/// The lines of a Markdown text, fences tracked; in ```sh and ```ini blocks backslash continuations are joined.
fn logical_lines(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    let mut pending: Option<Line> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        if let Some(info) = raw.trim_start().strip_prefix("```") {
            if let Some(p) = pending.take() {
                out.push(p);
            }
            fence = match fence {
                Some(_) => None,
                None => Some(info.trim().to_owned()),
            };
            continue;
        }
        let lang = fence.as_deref();
        let shell = lang.is_some_and(|f| f == "sh" || f == "bash" || f == "shell");
        let ini = lang == Some("ini");
        let command =
            shell || (ini && raw.starts_with("Exec")) || (lang.is_some() && raw.trim_start().starts_with("$ "));
        let (body, continues) = match raw.strip_suffix('\\') {
            Some(b) if shell || ini => (b, true),
            _ => (raw, false),
        };
        let line = match pending.take() {
            Some(mut p) => {
                p.text.push(' ');
                p.text.push_str(body.trim_start());
                p
            }
            None => Line { number, text: body.to_owned(), command, in_code: fence.is_some() },
        };
        if continues {
            pending = Some(line);
        } else {
            out.push(line);
        }
    }
    out.extend(pending);
    out
}

/// `BINARY SUB ...` named in a document.
#[derive(Debug)]
struct Mention {
    file: String,
    line: usize,
    binary: &'static str,
    sub: String,
    /// `--flags` before the subcommand (checked in `BINARY --help`); only from command lines.
    global_flags: Vec<String>,
    /// `--flags` after the subcommand on the same command line; only from command lines.
    flags: Vec<String>,
}

fn flag_name(token: &str) -> Option<String> {
    let rest = token.strip_prefix("--")?;
    let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-').collect();
    (!name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())).then(|| format!("--{name}"))
}

/// Does this token end the command line the subcommand is on?
fn ends_command(token: &str) -> bool {
    matches!(token, "--" | "|" | "||" | "&&" | ";" | "&") || token.starts_with('#') || token.starts_with("$(")
}

fn mentions_in(file: &str, line: &Line) -> Vec<Mention> {
    let mut found = Vec::new();
    for (binary, _) in BINARIES {
        let text = line.text.as_str();
        let mut from = 0;
        while let Some(at) = text[from..].find(binary).map(|i| i + from) {
            from = at + binary.len();
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                continue;
            }
            if !text[from..].starts_with(' ') {
                continue; // `ec-macvtap:`, `ec-ipxe-qemu[66]`, `ec-ipxe-qemu-doctor`, a bare `ec-macvtap`
            }
            let mut tokens = text[from..].split_whitespace();
            let mut global_flags = Vec::new();
            let mut sub = None;
            while let Some(token) = tokens.next() {
                if token.starts_with('[') {
                    // A synopsis' optional group: `[--netns NAME|PATH]`, `[-j|--json]`.
                    let mut t = token;
                    while !t.ends_with(']') {
                        match tokens.next() {
                            Some(n) => t = n,
                            None => break,
                        }
                    }
                    continue;
                }
                if token.starts_with('-') {
                    if let Some(f) = flag_name(token) {
                        if GLOBAL_WITH_VALUE.contains(&f.as_str()) && !token.contains('=') {
                            tokens.next();
                        }
                        global_flags.push(f);
                    }
                    continue;
                }
                let name: String =
                    token.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-').collect();
                let rest = &token[name.len()..];
                let word = !name.is_empty() && name.starts_with(|c: char| c.is_ascii_lowercase());
                if word && rest.chars().next().is_none_or(|c| "`,.;:)/'\"".contains(c)) {
                    sub = Some(name);
                }
                break; // a placeholder (`COMMAND`, `<SUB>`) or prose: not a mention
            }
            let Some(sub) = sub else { continue };
            let mut flags = Vec::new();
            if line.command {
                for token in tokens {
                    if ends_command(token) {
                        break;
                    }
                    flags.extend(flag_name(token));
                    if token.ends_with(')') || token.ends_with(';') {
                        break;
                    }
                }
            } else {
                global_flags.clear();
            }
            found.push(Mention { file: file.to_owned(), line: line.number, binary, sub, global_flags, flags });
        }
    }
    found
}

fn binary_path(binary: &str) -> &'static str {
    BINARIES.iter().find(|(b, _)| *b == binary).map(|(_, p)| *p).expect("a known binary")
}

/// `BINARY [SUB] --help`: its stdout, or why it failed.
fn help(binary: &str, sub: Option<&str>) -> Result<String, String> {
    let out = Command::new(binary_path(binary))
        .args(sub)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("run {binary}: {e}"));
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
    let code = out.status.code().map_or_else(|| "by a signal".to_owned(), |c| c.to_string());
    Err(format!("`{binary} {} --help` exited {code}: {first}", sub.unwrap_or("")))
}

fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag)
        .any(|(i, _)| help[i + flag.len()..].chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-')))
}

/// The subcommands `BINARY --help` lists (without clap's `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|s| s != "help")
        .collect()
}

fn all_mentions() -> Vec<Mention> {
    documents()
        .iter()
        .flat_map(|(file, text)| logical_lines(text).iter().flat_map(|l| mentions_in(file, l)).collect::<Vec<_>>())
        .collect()
}

#[test]
fn every_documented_command_parses() {
    let mentions = all_mentions();
    let mut helps: BTreeMap<(&str, Option<String>), Result<String, String>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut checked_flags = 0;
    for m in &mentions {
        let sub_help =
            helps.entry((m.binary, Some(m.sub.clone()))).or_insert_with(|| help(m.binary, Some(&m.sub))).clone();
        match sub_help {
            Err(why) => problems.push(format!(
                "{}:{}: `{} {}`: not a subcommand of {} ({why})",
                m.file, m.line, m.binary, m.sub, m.binary
            )),
            Ok(text) => {
                for flag in &m.flags {
                    checked_flags += 1;
                    if !help_has_flag(&text, flag) {
                        problems.push(format!(
                            "{}:{}: `{} {} ... {flag}`: {flag} is not in `{} {} --help`",
                            m.file, m.line, m.binary, m.sub, m.binary, m.sub
                        ));
                    }
                }
            }
        }
        let top = helps.entry((m.binary, None)).or_insert_with(|| help(m.binary, None)).clone();
        let top = top.unwrap_or_else(|why| panic!("{why}"));
        for flag in &m.global_flags {
            checked_flags += 1;
            if !help_has_flag(&top, flag) {
                problems.push(format!(
                    "{}:{}: `{} {flag} {}`: {flag} is not in `{} --help`",
                    m.file, m.line, m.binary, m.sub, m.binary
                ));
            }
        }
    }
    // Every subcommand is documented somewhere.
    for (binary, _) in BINARIES {
        let top = help(binary, None).unwrap_or_else(|why| panic!("{why}"));
        let subs = subcommands(&top);
        assert!(!subs.is_empty(), "`{binary} --help` lists no subcommands:\n{top}");
        let named: BTreeSet<&str> = mentions.iter().filter(|m| m.binary == binary).map(|m| m.sub.as_str()).collect();
        for sub in subs {
            if !named.contains(sub.as_str()) {
                problems
                    .push(format!("`{binary} {sub}` is in `{binary} --help` but named nowhere in README.md or docs/"));
            }
        }
    }
    eprintln!("{} command mentions, {checked_flags} flags checked", mentions.len());
    assert!(problems.is_empty(), "the documentation names commands the binaries do not have:\n{}", problems.join("\n"));
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors a Markdown text's headings make (outside code blocks; repeats get `-1`, `-2`, ...).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in logical_lines(text) {
        if line.in_code {
            continue;
        }
        let Some(rest) = line.text.strip_prefix('#') else { continue };
        let title = rest.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let base = slug(title);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of `[text](target)` links on a line (not in `code spans`).
fn link_targets(line: &str) -> Vec<String> {
    let line: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
    line.match_indices("](")
        .filter_map(|(i, _)| line[i + 2..].split_once(')').map(|(t, _)| t.trim().to_owned()))
        .collect()
}

#[test]
fn relative_links_resolve() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (file, text) in documents() {
        let dir = Path::new(&file).parent().unwrap_or(Path::new("")).to_path_buf();
        for line in logical_lines(&text) {
            if line.in_code {
                continue;
            }
            for target in link_targets(&line.text) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let resolved = if path.is_empty() { PathBuf::from(&file) } else { dir.join(path) };
                let on_disk = repo().join(&resolved);
                if !on_disk.exists() {
                    problems.push(format!(
                        "{file}:{}: link `{target}`: {} does not exist",
                        line.number,
                        resolved.display()
                    ));
                    continue;
                }
                if let Some(anchor) = anchor
                    && resolved.extension().is_some_and(|e| e == "md")
                {
                    let target_text = std::fs::read_to_string(&on_disk).unwrap_or_default();
                    if !anchors(&target_text).contains(anchor) {
                        problems.push(format!(
                            "{file}:{}: link `{target}`: no heading of {} makes the anchor #{anchor}",
                            line.number,
                            resolved.display()
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{checked} relative links checked");
    assert!(checked > 0, "no relative link found: the README links its docs/ pages");
    assert!(problems.is_empty(), "broken links in the documentation:\n{}", problems.join("\n"));
}

#[test]
fn the_extraction_finds_commands_and_flags() {
    // The checks above are only as good as what they extract: pin it on known lines.
    let m = mentions_in(
        "x.md",
        &Line {
            number: 7,
            text: "ec-macvtap --netns lab --json show ec-lan0 | jq -r .mac".to_owned(),
            command: true,
            in_code: true,
        },
    );
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].binary, m[0].sub.as_str(), m[0].line), ("ec-macvtap", "show", 7));
    assert_eq!(m[0].global_flags, ["--netns", "--json"]);
    assert!(m[0].flags.is_empty());

    let lines = logical_lines(
        "```sh\nec-macvtap exec --name ec-lan0 -- qemu-system-x86_64 \\\n    -netdev tap,fd={fd} --bogus\n```\n",
    );
    assert_eq!(lines.len(), 1);
    let m = mentions_in("x.md", &lines[0]);
    assert_eq!((m[0].sub.as_str(), m[0].flags.as_slice()), ("exec", ["--name".to_owned()].as_slice()));

    let prose = Line {
        number: 1,
        text: "runs `ec-ipxe-qemu run` with; ec-ipxe-qemu: boot net0; ec-macvtap[65]: x; `ec-macvtap` rows; \
               man ec-ipxe-qemu-run; ec-macvtap [--netns NAME|PATH] COMMAND"
            .to_owned(),
        command: false,
        in_code: false,
    };
    let subs: Vec<String> =
        mentions_in("x.md", &prose).into_iter().map(|m| format!("{} {}", m.binary, m.sub)).collect();
    assert_eq!(subs, ["ec-ipxe-qemu run"]);

    assert!(
        anchors("# A\n## `ec-ipxe-qemu doctor`\n```\n# not a heading\n```\n## Exit codes (both binaries)\n")
            .is_superset(&["ec-ipxe-qemu-doctor".to_owned(), "exit-codes-both-binaries".to_owned()].into())
    );
    assert!(!help_has_flag("  --state-dir <DIR>", "--state"));
}
