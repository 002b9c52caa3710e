//! W3C baggage (https://www.w3.org/TR/baggage/) as far as eastwest needs it: read the label
//! members, replace or remove them, and leave every other member byte for byte as it came.
//!
//! Input is raw header bytes (possibly several `baggage` headers, possibly not UTF-8); nothing
//! here panics on any input.

use crate::labels::{Label, Labels};

/// Largest baggage the filters read claims from, as the W3C limit (8192 bytes for all
/// `baggage` headers together). Larger baggage is still forwarded, but no label is read from it.
pub const DEFAULT_MAX_BAGGAGE_BYTES: usize = 8192;

/// Most list members read, as the W3C limit (64).
pub const MAX_MEMBERS: usize = 64;

/// One list member: its raw bytes as they came, and its key and value with optional
/// whitespace trimmed (value without properties, still percent-encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub raw: &'a [u8],
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

fn is_ows(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = bytes {
        if !is_ows(*first) {
            break;
        }
        bytes = rest;
    }
    while let [rest @ .., last] = bytes {
        if !is_ows(*last) {
            break;
        }
        bytes = rest;
    }
    bytes
}

/// Splits one `baggage` header value into its members. Empty segments (`a=1,,b=2`) are skipped.
pub fn members(header: &[u8]) -> Members<'_> {
    Members { rest: Some(header) }
}

/// The members of one header value, each found in a single pass over its bytes (this runs on
/// every request: no nested splitting).
pub struct Members<'a> {
    /// What is left after the last member; `None` once the last segment was read.
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for Members<'a> {
    type Item = Member<'a>;

    fn next(&mut self) -> Option<Member<'a>> {
        loop {
            let rest = self.rest?;
            let (segment, after) = match crate::bytes::find_byte(rest, b',') {
                Some(comma) => (&rest[..comma], Some(&rest[comma + 1..])),
                None => (rest, None),
            };
            self.rest = after;
            let trimmed = trim_ows(segment);
            if trimmed.is_empty() {
                continue;
            }
            let (key, value) = match crate::bytes::find_byte(trimmed, b'=') {
                Some(equals) => {
                    let after = &trimmed[equals + 1..];
                    let value = match crate::bytes::find_byte(after, b';') {
                        Some(semicolon) => &after[..semicolon],
                        None => after,
                    };
                    (trim_ows(&trimmed[..equals]), Some(trim_ows(value)))
                }
                None => (trimmed, None),
            };
            return Some(Member {
                raw: segment,
                key,
                value,
            });
        }
    }
}

/// The label members of one header value, in order, as [`members`] would yield them (every
/// label key has a `.`: only the segments around a `.` are parsed, the rest is skipped eight
/// bytes at a time).
pub fn label_members(header: &[u8]) -> impl Iterator<Item = Member<'_>> {
    let mut position = 0;
    std::iter::from_fn(move || loop {
        let rest = header.get(position..)?;
        let dot = position + crate::bytes::find_byte(rest, b'.')?;
        // The segment around the dot: back to the comma before it (not before `position`,
        // where the previous segment ended), forward to the comma after it.
        let start = header[position..dot]
            .iter()
            .rposition(|&byte| byte == b',')
            .map_or(position, |comma| position + comma + 1);
        let end = crate::bytes::find_byte(&header[dot..], b',').map_or(header.len(), |c| dot + c);
        position = end + 1;
        if let Some(member) = members(&header[start..end]).next() {
            if Label::from_baggage_key(member.key).is_some() {
                return Some(member);
            }
        }
    })
}

/// How many list members the header values hold at most: one more than their commas each
/// (empty segments, which are not members, are counted too). Exact enough to know the
/// baggage is within [`MAX_MEMBERS`] without splitting it.
fn member_bound(headers: &[&[u8]]) -> usize {
    headers
        .iter()
        .map(|header| 1 + crate::bytes::count_byte(header, b','))
        .sum()
}

/// Whether the header values hold more than [`MAX_MEMBERS`] members.
pub fn too_many_members(headers: &[&[u8]]) -> bool {
    member_bound(headers) > MAX_MEMBERS
        && headers
            .iter()
            .flat_map(|h| members(h))
            .nth(MAX_MEMBERS)
            .is_some()
}

/// W3C baggage-octet: the bytes a value may carry unencoded (`%` is in the range but must be
/// encoded so that decoding is unambiguous).
fn is_baggage_octet(byte: u8) -> bool {
    matches!(byte, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && byte != b'%'
}

/// Appends `key=value` to a member list, percent-encoding the value.
pub fn push_member(out: &mut String, key: &str, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(key);
    out.push('=');
    for &byte in value.as_bytes() {
        if is_baggage_octet(byte) {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xF)] as char);
        }
    }
}

/// Decodes a percent-encoded value; `None` when a `%` is not followed by two hex digits.
pub fn percent_decode(value: &[u8]) -> Option<Vec<u8>> {
    fn hex(byte: u8) -> Option<u8> {
        match byte {
            b'0'..=b'9' => Some(byte - b'0'),
            b'a'..=b'f' => Some(byte - b'a' + 10),
            b'A'..=b'F' => Some(byte - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(value.len());
    let mut index = 0;
    while index < value.len() {
        let byte = value[index];
        if byte == b'%' {
            let high = hex(*value.get(index + 1)?)?;
            let low = hex(*value.get(index + 2)?)?;
            out.push(high << 4 | low);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    Some(out)
}

/// What reading label claims from baggage found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    /// The labels claimed (valid values only; the first member of a key wins).
    pub labels: Labels,
    /// Whether any label member was present at all, valid or not.
    pub present: bool,
    /// Label members skipped because their value was badly encoded or invalid, or repeated.
    pub malformed_members: u32,
    /// The baggage was larger than the limit or had too many members: no claim was read.
    pub oversized: bool,
}

/// Reads the label members of all `baggage` header values together.
pub fn read_claims(headers: &[&[u8]], max_bytes: usize) -> Claims {
    let mut claims = Claims::default();
    let total: usize = headers.iter().map(|header| header.len()).sum();
    let too_many = headers
        .iter()
        .flat_map(|h| members(h))
        .nth(MAX_MEMBERS)
        .is_some();
    if total > max_bytes || too_many {
        claims.oversized = true;
        claims.present = headers
            .iter()
            .flat_map(|h| members(h))
            .any(|member| Label::from_baggage_key(member.key).is_some());
        return claims;
    }
    for member in headers.iter().flat_map(|h| members(h)) {
        let Some(label) = Label::from_baggage_key(member.key) else {
            continue;
        };
        claims.present = true;
        if claims.labels.is_set(label) {
            claims.malformed_members += 1;
            continue;
        }
        let decoded = member.value.and_then(percent_decode);
        match decoded {
            Some(value) if claims.labels.set_checked(label, &value).is_ok() => {}
            _ => claims.malformed_members += 1,
        }
    }
    claims
}

/// Rebuilds the baggage with `own_members` (already encoded, may be empty) first, followed by
/// every member of `headers` whose key is not a label key, each byte for byte as it came.
/// `None` when nothing remains (the header should then be removed).
pub fn replace_label_members(headers: &[&[u8]], own_members: &str) -> Option<Vec<u8>> {
    let capacity = own_members.len() + headers.iter().map(|h| h.len() + 1).sum::<usize>();
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(own_members.as_bytes());
    for header in headers {
        if is_one_plain_member(header) {
            // The common case of an application's own baggage: kept as it is, unparsed.
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(header);
            continue;
        }
        for member in members(header) {
            if Label::from_baggage_key(member.key).is_some() {
                continue;
            }
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(member.raw);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A header value that is exactly one member and not a label one: no `,` (one segment), not
/// blank, and no `.` (every label key has one), so [`members`] would yield it whole.
fn is_one_plain_member(header: &[u8]) -> bool {
    !trim_ows(header).is_empty()
        && crate::bytes::find_byte(header, b',').is_none()
        && crate::bytes::find_byte(header, b'.').is_none()
}

/// Whether any header carries a label member (cheap check before rewriting).
pub fn has_label_members(headers: &[&[u8]]) -> bool {
    headers
        .iter()
        .any(|header| label_members(header).next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn splits_members_with_whitespace_and_properties() {
        let parsed: Vec<_> = members(b"a=1, b = 2 ;prop=x,,c").collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].key, b"a");
        assert_eq!(parsed[0].value, Some(&b"1"[..]));
        assert_eq!(parsed[1].raw, b" b = 2 ;prop=x");
        assert_eq!(parsed[1].key, b"b");
        assert_eq!(parsed[1].value, Some(&b"2"[..]));
        assert_eq!(parsed[2].key, b"c");
        assert_eq!(parsed[2].value, None);
    }

    #[test]
    fn percent_encoding_round_trips_every_byte_of_utf8() {
        let value = "a b,c;d\\e\"f%g=h/é☃";
        let mut encoded = String::new();
        push_member(&mut encoded, "k", value);
        let encoded_value = encoded.strip_prefix("k=").unwrap();
        assert!(!encoded_value.contains([' ', ',', ';', '\\', '"']));
        assert_eq!(
            percent_decode(encoded_value.as_bytes()).unwrap(),
            value.as_bytes()
        );
    }

    #[test]
    fn percent_decode_refuses_broken_escapes() {
        assert_eq!(percent_decode(b"a%2"), None);
        assert_eq!(percent_decode(b"a%zz"), None);
        assert_eq!(percent_decode(b"%41%62"), Some(b"Ab".to_vec()));
    }

    #[test]
    fn reads_claims_from_several_headers() {
        let claims = read_claims(
            &[
                b"userid=42,service.name=frontend",
                b"k8s.namespace.name=shop, eastwest.team=web%20team;ttl=1",
            ],
            DEFAULT_MAX_BAGGAGE_BYTES,
        );
        assert!(claims.present);
        assert_eq!(claims.malformed_members, 0);
        assert_eq!(claims.labels.get(Label::Service), Some("frontend"));
        assert_eq!(claims.labels.get(Label::Namespace), Some("shop"));
        assert_eq!(claims.labels.get(Label::Team), Some("web team"));
    }

    #[test]
    fn malformed_claims_are_counted_and_skipped() {
        let claims = read_claims(
            &[b"service.name=%zz,eastwest.team=%FF%FE,service.criticality=urgent,cloud.region=eu,cloud.region=us,k8s.namespace.name"],
            DEFAULT_MAX_BAGGAGE_BYTES,
        );
        assert_eq!(claims.malformed_members, 5);
        assert_eq!(claims.labels.get(Label::Region), Some("eu"));
        assert_eq!(claims.labels.get(Label::Service), None);
    }

    #[test]
    fn oversized_baggage_yields_no_claims() {
        let mut big = b"service.name=admin,".to_vec();
        big.extend(std::iter::repeat_n(b'x', 9000));
        let claims = read_claims(&[&big], DEFAULT_MAX_BAGGAGE_BYTES);
        assert!(claims.oversized);
        assert!(claims.present);
        assert!(claims.labels.is_empty());

        let many: String = (0..65).map(|i| format!("k{i}=v,")).collect();
        let claims = read_claims(
            &[many.as_bytes(), b"service.name=x"],
            DEFAULT_MAX_BAGGAGE_BYTES,
        );
        assert!(claims.oversized);
    }

    #[test]
    fn replacing_keeps_other_members_byte_for_byte() {
        let original: &[&[u8]] = &[
            b"userid=alice%20b ;p=1,service.name=forged",
            b" eastwest.team=x,\xff\xfeodd=\x80",
        ];
        let out = replace_label_members(original, "service.name=frontend").unwrap();
        assert_eq!(
            out,
            b"service.name=frontend,userid=alice%20b ;p=1,\xff\xfeodd=\x80".to_vec()
        );
        assert_eq!(replace_label_members(&[b"service.name=forged"], ""), None);
        assert_eq!(
            replace_label_members(&[], "service.name=a").unwrap(),
            b"service.name=a".to_vec()
        );
        assert!(has_label_members(original));
        assert!(!has_label_members(&[b"a=1"]));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u32 = 0x1234_5678;
        for length in 0..300 {
            let bytes: Vec<u8> = (0..length)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    b"=,;% \tservice.name%A1\xff"[(state >> 16) as usize % 22]
                })
                .collect();
            let _ = read_claims(&[&bytes], 64);
            let _ = replace_label_members(&[&bytes], "a=b");
            let _ = percent_decode(&bytes);
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Bytes that look like baggage often enough to reach every branch.
    fn baggage_like() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                Just(b"service.name=".to_vec()),
                Just(b"eastwest.team=".to_vec()),
                Just(b",".to_vec()),
                Just(b";p=1".to_vec()),
                Just(b"%".to_vec()),
                Just(b" ".to_vec()),
                prop::collection::vec(any::<u8>(), 0..6),
            ],
            0..24,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn never_panics_on_any_input(header in baggage_like(), other in any::<Vec<u8>>()) {
            let _ = read_claims(&[&header, &other], DEFAULT_MAX_BAGGAGE_BYTES);
            let _ = replace_label_members(&[&header, &other], "service.name=a");
            let _ = percent_decode(&header);
        }

        #[test]
        fn the_plain_member_shortcut_changes_nothing(
            header in baggage_like(),
            raw in proptest::collection::vec(any::<u8>(), 0..24),
        ) {
            // What replace_label_members gives without its shortcut.
            let reference = |headers: &[&[u8]]| {
                let mut out = b"service.name=own".to_vec();
                for member in headers.iter().flat_map(|h| members(h)) {
                    if Label::from_baggage_key(member.key).is_none() {
                        out.push(b',');
                        out.extend_from_slice(member.raw);
                    }
                }
                out
            };
            for headers in [vec![&header[..]], vec![&raw[..]], vec![&raw[..], &header[..]]] {
                prop_assert_eq!(
                    replace_label_members(&headers, "service.name=own").unwrap(),
                    reference(&headers)
                );
            }
        }

        #[test]
        fn label_members_are_the_label_members_of_members(
            header in baggage_like(),
            raw in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            for value in [&header[..], &raw[..]] {
                let all: Vec<Member> = members(value)
                    .filter(|m| Label::from_baggage_key(m.key).is_some())
                    .collect();
                let fast: Vec<Member> = label_members(value).collect();
                prop_assert_eq!(fast, all);
                let count = members(value).count();
                prop_assert_eq!(too_many_members(&[value]), count > MAX_MEMBERS);
            }
        }

        #[test]
        fn replacing_keeps_every_other_member_in_order(header in baggage_like()) {
            let kept: Vec<&[u8]> = members(&header)
                .filter(|m| Label::from_baggage_key(m.key).is_none())
                .map(|m| m.raw)
                .collect();
            let rebuilt = replace_label_members(&[&header], "service.name=own");
            let rebuilt = rebuilt.unwrap_or_default();
            let after: Vec<&[u8]> = members(&rebuilt).map(|m| m.raw).collect();
            prop_assert_eq!(after[0], &b"service.name=own"[..]);
            prop_assert_eq!(&after[1..], &kept[..]);
        }

        #[test]
        fn encoded_values_decode_to_themselves(value in "\\PC{1,40}") {
            let mut out = String::new();
            push_member(&mut out, "k", &value);
            let encoded = &out.as_bytes()[2..];
            prop_assert!(encoded.iter().all(|&b| is_baggage_octet(b) || b == b'%'));
            prop_assert_eq!(percent_decode(encoded).unwrap(), value.as_bytes());
        }
    }
}
