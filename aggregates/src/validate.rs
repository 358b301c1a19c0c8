//! Input rules shared by commands and the HTTP layer: names, slugs, country codes, domains,
//! e-mail addresses, emoji, media types. Each returns the normalised value or a message a
//! client can act on.

use unicode_properties::emoji::is_tag_character;
use unicode_properties::{GeneralCategory, UnicodeEmoji, UnicodeGeneralCategory};

/// The officially assigned ISO 3166-1 alpha-2 codes.
const ISO_3166_1_ALPHA_2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF \
BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW \
CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM \
GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH \
KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP \
MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN \
PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE \
YT ZA ZM ZW";

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_REASON_CHARS: usize = 500;
pub const MAX_EMOJI_CHARS: usize = 16;
pub const MAX_EMOJI_BYTES: usize = 64;
pub const MAX_MIME_TYPE_CHARS: usize = 255;

/// Characters that show nothing and change no letter, by which a name can pass for another
/// ("Acme" and "Acme\u{200B}", "support" and "support\u{E0041}") or show its text in another
/// order. These are every format character (general category Cf: zero-width space, word
/// joiner, invisible operators, soft hyphen, byte-order mark, the Mongolian vowel separator,
/// the direction marks, embeddings, overrides and isolates, tag characters, interlinear
/// annotation and musical formatting characters, ...), as the tables of `unicode-properties`
/// have them, and the default-ignorable code points of other categories (Unicode 16.0,
/// DerivedCoreProperties.txt): the combining grapheme joiner, the Hangul fillers, the Khmer
/// inherent vowels and the unassigned default-ignorables.
///
/// Some stay on purpose, as letters and emoji need them: the joiners ([`is_joiner`]) and the
/// variation selectors, only where their scripts use them ([`misplaced_invisible`]). One of
/// these can still follow a base that takes it unseen ("❤" and "❤\u{FE0F}" are two names: a
/// limit of this rule, not of the uniqueness check). The blank Braille cell (U+2800), which
/// draws nothing though it is no format character, goes with the rest.
fn is_invisible_format(c: char) -> bool {
    (c.general_category() == GeneralCategory::Format && !is_joiner(c))
        || matches!(
            c,
            '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{2065}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFF8}'
                | '\u{E0000}'..='\u{E00FF}'
                | '\u{E01F0}'..='\u{E0FFF}'
        )
}

/// The zero-width non-joiner and joiner: Persian and Indic names, emoji sequences.
fn is_joiner(c: char) -> bool {
    matches!(c, '\u{200C}' | '\u{200D}')
}

/// The first joiner or selector where no letter or emoji needs one, by which a name could
/// pass for another unseen ("support" and "support\u{FE0F}", "Мария" and "Мар\u{200C}ия") or
/// be nothing but invisible. Each is placed only where its script uses it:
/// - a joiner after a virama, a non-joiner also between two Arabic-script letters (the
///   CONTEXTJ rules of RFC 5892, the Arabic joining context simplified), and a joiner between
///   two emoji (a ZWJ sequence of UTS #51, a presentation selector after the first allowed);
/// - an emoji presentation selector (U+FE0E, U+FE0F) after an emoji, or a keycap's `#`, `*`
///   or digit before U+20E3;
/// - the other variation selectors after the ideographs, symbols and scripts that have
///   standardized or ideographic variants ([`has_variants`]);
/// - the Mongolian free variation selectors (U+180E, a format character, is refused with the
///   rest) after a Mongolian letter.
fn misplaced_invisible(v: &str) -> Option<char> {
    let chars: Vec<char> = v.chars().collect();
    let is_emoji = |c: char| !c.is_ascii() && c.is_emoji_char();
    chars.iter().enumerate().find_map(|(i, &c)| {
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        let placed = match c {
            '\u{200C}' | '\u{200D}' => {
                let after_virama = before.is_some_and(|b| {
                    unicode_normalization::char::canonical_combining_class(b) == 9
                });
                let arabic = c == '\u{200C}'
                    && before.is_some_and(is_arabic_letter)
                    && after.is_some_and(is_arabic_letter);
                let emoji_before = match before {
                    Some('\u{FE0F}') => i >= 2 && is_emoji(chars[i - 2]),
                    Some(b) => is_emoji(b),
                    None => false,
                };
                let sequence = c == '\u{200D}' && emoji_before && after.is_some_and(is_emoji);
                after_virama || arabic || sequence
            }
            '\u{FE0E}' | '\u{FE0F}' => {
                before.is_some_and(is_emoji)
                    || (before.is_some_and(|b| matches!(b, '#' | '*' | '0'..='9'))
                        && after == Some('\u{20E3}'))
            }
            '\u{FE00}'..='\u{FE0D}' | '\u{E0100}'..='\u{E01EF}' => before.is_some_and(has_variants),
            '\u{180B}'..='\u{180D}' | '\u{180F}' => {
                before.is_some_and(|b| ('\u{1820}'..='\u{18AF}').contains(&b))
            }
            _ => true,
        };
        (!placed).then_some(c)
    })
}

/// A letter of the Arabic script's blocks.
fn is_arabic_letter(c: char) -> bool {
    c.is_alphabetic()
        && matches!(
            c,
            '\u{0600}'..='\u{06FF}'
                | '\u{0750}'..='\u{077F}'
                | '\u{0870}'..='\u{08FF}'
                | '\u{FB50}'..='\u{FDFF}'
                | '\u{FE70}'..='\u{FEFF}'
        )
}

/// A character of the blocks where standardized variation sequences (Myanmar, Phags-pa,
/// mathematical and other symbols, Egyptian hieroglyphs) and ideographic variation sequences
/// (CJK ideographs) have their bases: not Latin, Greek or Cyrillic letters.
fn has_variants(c: char) -> bool {
    matches!(
        c,
        '\u{1000}'..='\u{109F}'
            | '\u{2000}'..='\u{2BFF}'
            | '\u{3000}'..='\u{9FFF}'
            | '\u{A840}'..='\u{A87F}'
            | '\u{F900}'..='\u{FAFF}'
            | '\u{13000}'..='\u{1345F}'
            | '\u{20000}'..='\u{3FFFF}'
    )
}

/// A display name: trimmed, 1 to [`MAX_NAME_CHARS`] characters, no control characters and
/// no invisible formatting characters ([`is_invisible_format`]).
pub fn name(field: &str, value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if v.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "{field} must be at most {MAX_NAME_CHARS} characters"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    if let Some(c) = v.chars().find(|c| is_invisible_format(*c)) {
        return Err(format!(
            "{field} must not contain invisible formatting characters (U+{:04X})",
            u32::from(c)
        ));
    }
    if let Some(c) = misplaced_invisible(v) {
        return Err(format!(
            "{field} must not contain invisible formatting characters (U+{:04X}) where no \
             letter or emoji needs one",
            u32::from(c)
        ));
    }
    Ok(v.to_string())
}

/// Free text up to [`MAX_DESCRIPTION_CHARS`] characters (may be empty), lines and tabs
/// allowed but no other control characters.
pub fn description(value: &str) -> Result<String, String> {
    // Measured as kept: a line break a text area adds is trimmed, not counted.
    if value.trim().chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        ));
    }
    free_text("description", value)?;
    Ok(value.trim().to_string())
}

/// A message's text, checked before it is sealed (the domain sees only its size): free text
/// as [`description`]'s, and not blank unless empty (an empty text goes with attachments, a
/// blank one says nothing and shows nothing).
pub fn message_text(value: &str) -> Result<(), String> {
    if !value.is_empty() && value.trim().is_empty() {
        return Err("content must not be blank".to_string());
    }
    free_text("content", value)
}

/// Refuses control characters other than line breaks and tabs. Besides being invisible,
/// a NUL in particular cannot be stored by PostgreSQL's `text` or `jsonb`: an event carrying
/// one would be appended (the ledger keeps `json` text) and then stop every projection
/// that reads it.
fn free_text(field: &str, value: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(format!(
            "{field} must not contain control characters other than line breaks and tabs"
        ));
    }
    Ok(())
}

/// Whether JSON text holds a NUL character anywhere (in a string or a key). PostgreSQL's
/// `text` and `jsonb` cannot store one, so neither can any read model. In valid JSON a NUL
/// is only ever the escape `\u0000` (a raw one is a syntax error, but is caught too); an
/// escaped backslash followed by `u0000` is text, so escapes are stepped over whole.
pub fn json_has_nul(text: &[u8]) -> bool {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            0 => return true,
            b'\\' => {
                if text.get(i + 1..i + 6) == Some(b"u0000".as_slice()) {
                    return true;
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    false
}

/// A URL-safe slug: lower-case ASCII letters, digits and inner hyphens, 1 to 63 characters.
pub fn slug(value: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(value.to_string())
    } else {
        Err("slug must be 1-63 characters of a-z, 0-9 and inner hyphens".to_string())
    }
}

/// An ISO 3166-1 alpha-2 code, accepted in either case and stored upper-case.
pub fn country_code(value: &str) -> Result<String, String> {
    let upper = value.to_ascii_uppercase();
    if upper.len() == 2
        && ISO_3166_1_ALPHA_2
            .split_ascii_whitespace()
            .any(|c| c == upper)
    {
        Ok(upper)
    } else {
        Err(format!(
            "`{value}` is not an ISO 3166-1 alpha-2 country code"
        ))
    }
}

/// A DNS domain name (`example.com`), stored lower-case.
pub fn domain(value: &str) -> Result<String, String> {
    let v = value.to_ascii_lowercase();
    let labels_ok = v.split('.').all(|l| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    if v.len() <= 253 && v.contains('.') && labels_ok {
        Ok(v)
    } else {
        Err(format!("`{value}` is not a valid domain name"))
    }
}

/// An e-mail address, deliberately strict: `local@domain` with a dotted domain, no spaces.
/// Returns the address with its domain lower-cased (the local part keeps its case).
pub fn email(value: &str) -> Result<String, String> {
    let v = value.trim();
    let err = || format!("`{v}` is not a valid e-mail address");
    if v.len() > MAX_EMAIL_CHARS {
        return Err(err());
    }
    let (local, dom) = v.rsplit_once('@').ok_or_else(err)?;
    let local_ok = (1..=64).contains(&local.len())
        && local
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&c))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    let dom = domain(dom).map_err(|_| err())?;
    if !local_ok {
        return Err(err());
    }
    Ok(format!("{local}@{dom}"))
}

/// An optional reason for a state change: trimmed, at most [`MAX_REASON_CHARS`] characters.
/// A blank reason is no reason, so the events never carry empty strings.
pub fn reason(value: Option<&str>) -> Result<Option<String>, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if v.chars().count() > MAX_REASON_CHARS {
        return Err(format!(
            "reason must be at most {MAX_REASON_CHARS} characters"
        ));
    }
    free_text("reason", v)?;
    Ok(Some(v.to_string()))
}

/// A BLAKE3 digest in hex. Only lower case is accepted: digests are compared and claimed
/// as text, so two spellings of one digest must not both exist.
pub fn hex_digest(field: &str, value: &str) -> Result<String, String> {
    if value.len() == 64
        && value
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(value.to_string())
    } else {
        Err(format!("{field} must be 64 lower-case hexadecimal digits"))
    }
}

/// A reaction emoji, trimmed: 1 to [`MAX_EMOJI_CHARS`] characters and at most
/// [`MAX_EMOJI_BYTES`] bytes (enough for a ZWJ family or a flag with modifiers; the byte
/// bound states for storage what the character bound already implies in UTF-8), made of
/// emoji as [`is_emoji_run`] reads them. That keeps reactions from becoming free text (`ok`,
/// `+1`, `日本`) and from being invisible (`\u{200B}`, a lone combining mark or tag
/// character), while keycaps (`1️⃣`, `#️⃣`) and subdivision flags (🏴󠁧󠁢󠁥󠁮󠁧󠁿) pass. No Unicode
/// normalisation is applied: the emoji is returned exactly as given, minus the trimmed
/// whitespace, and two spellings of one emoji (with and without U+FE0F) are two reactions.
pub fn emoji(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("emoji must not be empty".to_string());
    }
    if v.chars().count() > MAX_EMOJI_CHARS || v.len() > MAX_EMOJI_BYTES {
        return Err(format!(
            "emoji must be at most {MAX_EMOJI_CHARS} characters and {MAX_EMOJI_BYTES} bytes"
        ));
    }
    if !is_emoji_run(v) {
        return Err(
            "emoji must be emoji only: no text, whitespace or invisible characters \
             (ASCII only as a keycap's base, as in 1️⃣)"
                .to_string(),
        );
    }
    Ok(v.to_string())
}

/// Whether `v` is one or more emoji as Unicode Technical Standard #51 builds them, with the
/// `Emoji` property from the tables of `unicode-properties`: each emoji is a non-ASCII
/// emoji character, a keycap (`#`, `*` or a digit, then an optional U+FE0F, then U+20E3) or
/// a subdivision flag (U+1F3F4, tag characters, the cancel tag U+E007F); a presentation
/// selector (U+FE0E, U+FE0F) follows an emoji, and a zero-width joiner stands between two.
/// Everything else, the components (joiner, selectors, keycap mark, tags) anywhere else
/// among it, is refused. The test is of form, not of RGI membership: 👍🏽 and 🧑‍🚀 pass, and
/// so would an unusual sequence of real emoji.
fn is_emoji_run(v: &str) -> bool {
    #[derive(PartialEq)]
    enum Last {
        Nothing,
        Emoji,
        Selector,
        Joiner,
    }
    let mut last = Last::Nothing;
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        last = match c {
            '#' | '*' | '0'..='9' => {
                chars.next_if_eq(&'\u{FE0F}');
                if chars.next_if_eq(&'\u{20E3}').is_none() {
                    return false;
                }
                Last::Emoji
            }
            '\u{1F3F4}' if chars.peek().copied().is_some_and(is_tag_character) => {
                while chars
                    .next_if(|t| matches!(t, '\u{E0020}'..='\u{E007E}'))
                    .is_some()
                {}
                if chars.next_if_eq(&'\u{E007F}').is_none() {
                    return false;
                }
                Last::Emoji
            }
            '\u{FE0E}' | '\u{FE0F}' if last == Last::Emoji => Last::Selector,
            '\u{200D}' if matches!(last, Last::Emoji | Last::Selector) => Last::Joiner,
            // The components (U+200D, U+20E3, U+FE0F, tags) are not `Emoji` themselves.
            c if !c.is_ascii() && c.is_emoji_char() => Last::Emoji,
            _ => return false,
        };
    }
    matches!(last, Last::Emoji | Last::Selector)
}

/// A media type without parameters (`image/png`), as RFC 6838 restricts registered names:
/// `type/subtype`, each 1 to 127 characters of letters, digits and `!#$&-^_.+`, starting
/// with a letter or digit; at most [`MAX_MIME_TYPE_CHARS`] characters in all. Media types
/// are case-insensitive, so the value is trimmed and returned lower-cased.
pub fn mime_type(value: &str) -> Result<String, String> {
    let v = value.trim().to_ascii_lowercase();
    let restricted_name = |name: &str| {
        (1..=127).contains(&name.len())
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
    };
    let ok = v.len() <= MAX_MIME_TYPE_CHARS
        && v.split_once('/')
            .is_some_and(|(t, s)| restricted_name(t) && restricted_name(s));
    if ok {
        Ok(v)
    } else {
        Err(format!(
            "mime_type `{}` is not a media type of the form type/subtype",
            value.trim()
        ))
    }
}

/// The form of an address that uniqueness is decided on: the whole address lower-cased.
pub fn email_identity(normalised: &str) -> String {
    normalised.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_list_is_the_full_iso_table() {
        assert_eq!(ISO_3166_1_ALPHA_2.split_ascii_whitespace().count(), 249);
        assert_eq!(country_code("de").unwrap(), "DE");
        assert!(country_code("XX").is_err());
        assert!(country_code("DEU").is_err());
        assert!(country_code("").is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name("name", "  Acme ").unwrap(), "Acme");
        assert!(name("name", "   ").is_err());
        assert!(name("name", &"x".repeat(201)).is_err());
        assert!(name("name", "a\u{0}b").is_err());
    }

    #[test]
    fn names_cannot_pass_for_others_with_invisible_characters() {
        for sneaky in [
            "Acme\u{200B}",
            "bidi\u{202E}x",
            "\u{FEFF}Acme",
            "Ac\u{00AD}me",
            "a\u{2066}b",
            "x\u{061C}y",
            "x\u{2062}y",
            // Every other format character (Cf): tags, the language tag, interlinear
            // annotation, musical formatting, shorthand format controls.
            "support\u{E0041}",
            "\u{E0001}Acme",
            "Ac\u{FFF9}me",
            "Ac\u{1D173}me",
            "Ac\u{1BCA0}me",
            "Ac\u{206A}me",
            // Default-ignorable code points that are not Cf: the combining grapheme joiner,
            // the Hangul fillers, the Khmer inherent vowels, unassigned ignorables.
            "Ac\u{034F}me",
            "\u{115F}Acme",
            "Acme\u{1160}",
            "Acme\u{3164}",
            "Acme\u{FFA0}",
            "Ac\u{17B4}me",
            "Ac\u{17B5}me",
            "Ac\u{2065}me",
            "Ac\u{FFF0}me",
            "Ac\u{E0080}me",
        ] {
            let refused = name("name", sneaky).unwrap_err();
            assert!(
                refused.contains("invisible formatting characters"),
                "{refused}"
            );
        }
        // Joiners are letters' business in some scripts, and emoji's.
        assert_eq!(name("name", "می\u{200C}خواهم").unwrap(), "می\u{200C}خواهم");
        assert_eq!(
            name("name", "👩\u{200D}💻 team").unwrap(),
            "👩\u{200D}💻 team"
        );
        // So are variation selectors: emoji presentation, ideographic variants.
        for kept in [
            "❤\u{FE0F} team",
            "葛\u{E0100}西",
            "ᠠ\u{180B}ᠨ",
            "#\u{FE0F}\u{20E3} team",
            // ZWJ sequences: a fire heart, a rainbow flag, a family, a technologist with a tone.
            "❤\u{FE0F}\u{200D}🔥",
            "🏳\u{FE0F}\u{200D}🌈",
            "👨\u{200D}👩\u{200D}👧",
            "🧑🏽\u{200D}💻",
            // After a virama: Malayalam and Bengali word ends, Sinhala's "Sri".
            "ജോണ്\u{200D}",
            "അര്\u{200D}ജുന്\u{200D}",
            "শরত্\u{200D}",
            "ශ්\u{200D}රී",
        ] {
            assert_eq!(name("name", kept).unwrap(), kept);
        }
        // But not where nothing needs one: after a Latin letter, at the start, alone; nor a
        // blank Braille cell, which draws nothing.
        for sneaky in [
            "support\u{FE0F}",
            "support\u{200D}",
            "sup\u{200C}port",
            "team 1\u{FE0F}",
            "\u{200C}",
            "\u{FE0F}\u{FE0F}",
            "\u{200D}team",
            "team \u{200D}",
            "support\u{2800}",
            "\u{2800}",
            // Twins of names in other scripts: no accented, Cyrillic or CJK letter takes one.
            "Café\u{FE0F}",
            "Мар\u{200C}ия",
            "山田\u{FE0F}",
            "Ελένη\u{FE00}",
        ] {
            let refused = name("name", sneaky).unwrap_err();
            assert!(
                refused.contains("invisible formatting characters"),
                "{sneaky:?}: {refused}"
            );
        }
    }

    #[test]
    fn descriptions_are_measured_as_kept() {
        let d = "d".repeat(MAX_DESCRIPTION_CHARS);
        assert_eq!(description(&format!(" {d}\n")).unwrap(), d);
        assert!(description(&format!("{d}d")).is_err());
    }

    #[test]
    fn message_text_is_free_text_and_not_blank() {
        assert!(message_text("").is_ok(), "empty goes with attachments");
        assert!(message_text("hi\n\tthere").is_ok());
        assert_eq!(
            message_text("   \n").unwrap_err(),
            "content must not be blank"
        );
        assert!(message_text("ding\u{7}")
            .unwrap_err()
            .contains("control characters"));
    }

    #[test]
    fn free_text_keeps_lines_and_tabs_but_no_other_control_characters() {
        assert_eq!(
            description(" line one\r\nline\ttwo ").unwrap(),
            "line one\r\nline\ttwo"
        );
        assert_eq!(
            reason(Some("why\nnot")).unwrap().as_deref(),
            Some("why\nnot")
        );
        for bad in ["a\u{0}b", "bell\u{7}", "esc\u{1b}[31m", "del\u{7f}"] {
            assert!(description(bad).is_err(), "{bad:?}");
            assert!(reason(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nul_is_found_in_json_text_only_where_it_is_a_character() {
        let text = |v: serde_json::Value| v.to_string();
        assert!(json_has_nul(
            text(serde_json::json!({"d": "a\u{0}b"})).as_bytes()
        ));
        assert!(json_has_nul(
            text(serde_json::json!({"k\u{0}": 1})).as_bytes()
        ));
        assert!(json_has_nul(br#"["\\\u0000"]"#));
        assert!(json_has_nul(b"[\"\0\"]"));
        // A backslash followed by the text `u0000`, and other escapes, are not a NUL.
        assert!(!json_has_nul(
            text(serde_json::json!({"d": "\\u0000"})).as_bytes()
        ));
        assert!(!json_has_nul(br#"["\\\\u0000", "\u0001", "\"u0000"]"#));
        assert!(!json_has_nul(b"{}"));
    }

    #[test]
    fn slugs_are_url_safe() {
        assert!(slug("acme-corp-2").is_ok());
        for bad in [
            "",
            "-acme",
            "acme-",
            "Acme",
            "ac me",
            "acme_corp",
            &"a".repeat(64),
        ] {
            assert!(slug(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails() {
        assert_eq!(email(" Ada@Example.COM ").unwrap(), "Ada@example.com");
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@@example.com",
            ".ada@example.com",
        ] {
            assert!(email(bad).is_err(), "{bad}");
        }
        assert_eq!(email_identity("Ada@example.com"), "ada@example.com");
    }

    #[test]
    fn reasons_are_trimmed_bounded_and_blank_means_none() {
        assert_eq!(reason(None).unwrap(), None);
        assert_eq!(reason(Some("   ")).unwrap(), None);
        assert_eq!(reason(Some(" late ")).unwrap().as_deref(), Some("late"));
        assert!(reason(Some(&"x".repeat(500))).is_ok());
        assert!(reason(Some(&"x".repeat(501))).is_err());
    }

    #[test]
    fn hex_digests_are_64_lower_case_digits() {
        assert!(hex_digest("hash", &"ab".repeat(32)).is_ok());
        for bad in [
            "".to_string(),
            "ab".repeat(31),
            "AB".repeat(32),
            "zz".repeat(32),
        ] {
            assert!(hex_digest("hash", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(domain("Example.COM").unwrap(), "example.com");
        assert!(domain("localhost").is_err());
        assert!(domain("-bad.com").is_err());
    }

    #[test]
    fn emoji_are_short_symbols_without_words() {
        for good in [
            "👍",
            " 🎉 ",
            "👍🏽",
            "👨‍👩‍👧‍👦",
            "🇩🇪",
            "❤️",
            "❤︎",
            "✅",
            "❤️\u{200D}🔥",
            "👍🎉",
            // Keycaps, fully qualified and not.
            "1️⃣",
            "#️⃣",
            "*\u{20E3}",
            // A subdivision flag: England.
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
        ] {
            assert_eq!(emoji(good).unwrap(), good.trim(), "{good}");
        }
        for bad in [
            "",
            "   ",
            "ok",
            "+1",
            ":)",
            "a/b",
            "👍/",
            "👍 👍",
            "👍\u{0}",
            "日本",
            "é",
            "1",
            "12",
            "1\u{FE0F}",
            "#",
            // Invisible, or marks and components with no emoji to go with.
            "\u{200B}",
            "👍\u{200B}",
            "\u{0301}",
            "👍\u{0301}",
            "\u{E0041}",
            "👍\u{E0041}",
            "🏴\u{E0067}\u{E0062}",
            "\u{200D}",
            "\u{200D}👍",
            "👍\u{200D}",
            "👍\u{200D}\u{200D}🎉",
            "\u{FE0F}",
            "\u{20E3}",
            "👍\u{20E3}",
            &"👍".repeat(17),
        ] {
            assert!(emoji(bad).is_err(), "{bad}");
        }
        // At the limit: 16 characters of 4 bytes each.
        assert!(emoji(&"👍".repeat(16)).is_ok());
    }

    #[test]
    fn mime_types_are_restricted_names_lower_cased() {
        assert_eq!(mime_type("image/png").unwrap(), "image/png");
        assert_eq!(mime_type(" Text/Plain ").unwrap(), "text/plain");
        assert_eq!(
            mime_type("application/vnd.openxmlformats-officedocument.wordprocessingml.document")
                .unwrap(),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        );
        assert!(mime_type("application/ld+json").is_ok());
        assert!(mime_type(&format!("a/{}", "b".repeat(127))).is_ok());
        for bad in [
            "".to_string(),
            "image".to_string(),
            "image/".to_string(),
            "/png".to_string(),
            "image/png/x".to_string(),
            "text/plain; charset=utf-8".to_string(),
            "image/p ng".to_string(),
            ".image/png".to_string(),
            "image/-png".to_string(),
            "imáge/png".to_string(),
            format!("a/{}", "b".repeat(128)),
            format!("{}/{}", "a".repeat(127), "b".repeat(128)),
        ] {
            assert!(mime_type(&bad).is_err(), "{bad}");
        }
    }
}
