//! The names the engine builds paths from and the md5s it stages files by:
//! [`SafeName`] (a table id, a reference's name, a package or domain slug) and
//! [`Md5Sum`], each validated once, where it is read — a manifest, a state file,
//! a journal record — so that holding one proves its rule.
//!
//! Invariant kept: a `SafeName` is one safe path component
//! ([`is_safe_component`], contract §1) and an `Md5Sum` is 32 lowercase hex
//! digits; neither can be built or decoded otherwise (construction only through
//! [`SafeName::parse`] / [`Md5Sum::parse`], and their `Deserialize` calls those).
//! Both encode exactly as the `String` they stand for (JSON and the journal's
//! bincode alike), so the state file's text and the journal's bytes are unchanged.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Is `s` one safe path component (a table id or name, a slug):
/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`? (`.` and `..` cannot start so.)
pub fn is_safe_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A value that is not one safe path component (it names the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a safe path component ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")]
pub struct UnsafeName(pub String);

/// A value that is not an md5 as the engine records it (it names the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("md5 {0:?} is not 32 lowercase hex digits")]
pub struct BadMd5(pub String);

/// One safe path component: a table id, a reference's name, a package or memory
/// domain slug. Compares, orders and hashes as its text (so a map keyed by it is
/// looked up by `&str`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SafeName(Box<str>);

impl SafeName {
    /// `text` as a name, if it is one safe path component.
    pub fn parse(text: impl Into<String> + AsRef<str>) -> Result<SafeName, UnsafeName> {
        if is_safe_component(text.as_ref()) {
            Ok(SafeName(text.into().into_boxed_str()))
        } else {
            Err(UnsafeName(text.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SafeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SafeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for SafeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SafeName {
    type Error = UnsafeName;
    fn try_from(text: String) -> Result<SafeName, UnsafeName> {
        SafeName::parse(text)
    }
}

impl TryFrom<&str> for SafeName {
    type Error = UnsafeName;
    fn try_from(text: &str) -> Result<SafeName, UnsafeName> {
        SafeName::parse(text)
    }
}

impl PartialEq<str> for SafeName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for SafeName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl fmt::Display for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for SafeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SafeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SafeName, D::Error> {
        d.deserialize_string(TextVisitor("a safe path component", |t| {
            SafeName::parse(t).map_err(|e| e.to_string())
        }))
    }
}

/// An md5 as the engine records it: 32 lowercase hex digits (kept as that text,
/// so that it reads as a `&str` where files are named by it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Md5Sum([u8; 32]);

impl Md5Sum {
    /// `text` as an md5, if it is 32 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Md5Sum, BadMd5> {
        match <[u8; 32]>::try_from(text.as_bytes()) {
            Ok(hex) if crate::md5x::is_md5_hex(text) => Ok(Md5Sum(hex)),
            _ => Err(BadMd5(text.to_string())),
        }
    }

    /// The md5 of these digest bytes.
    pub fn of_digest(bytes: &[u8; 16]) -> Md5Sum {
        let mut hex = [0u8; 32];
        crate::md5x::hex_into(bytes, &mut hex);
        Md5Sum(hex)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("parse admits only ASCII hex digits")
    }

    /// Whether `text` spells this md5 (exactly: the engine's md5s are lowercase).
    pub fn is(&self, text: &str) -> bool {
        self.0 == *text.as_bytes()
    }
}

impl std::ops::Deref for Md5Sum {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Md5Sum {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl TryFrom<&str> for Md5Sum {
    type Error = BadMd5;
    fn try_from(text: &str) -> Result<Md5Sum, BadMd5> {
        Md5Sum::parse(text)
    }
}

impl TryFrom<String> for Md5Sum {
    type Error = BadMd5;
    fn try_from(text: String) -> Result<Md5Sum, BadMd5> {
        Md5Sum::parse(&text)
    }
}

impl PartialEq<str> for Md5Sum {
    fn eq(&self, other: &str) -> bool {
        self.is(other)
    }
}

impl PartialEq<&str> for Md5Sum {
    fn eq(&self, other: &&str) -> bool {
        self.is(other)
    }
}

impl PartialEq<String> for Md5Sum {
    fn eq(&self, other: &String) -> bool {
        self.is(other)
    }
}

impl fmt::Display for Md5Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Md5Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Md5Sum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Md5Sum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Md5Sum, D::Error> {
        d.deserialize_string(TextVisitor("an md5 string", |t| {
            Md5Sum::parse(&t).map_err(|e| e.to_string())
        }))
    }
}

/// Reads a string (borrowed or owned: JSON gives either, the journal's bincode
/// an owned one) and validates it with the given rule; a refusal is the rule's
/// message, which names the value.
struct TextVisitor<T, F: FnOnce(String) -> Result<T, String>>(&'static str, F);

impl<T, F: FnOnce(String) -> Result<T, String>> serde::de::Visitor<'_> for TextVisitor<T, F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v.to_string()).map_err(E::custom)
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safe_name_is_one_path_component_and_encodes_as_its_text() {
        for ok in ["a", "tbl_a", "A.b-c_d", &"x".repeat(128)] {
            let n = SafeName::parse(ok).unwrap();
            assert_eq!(n, ok);
            assert_eq!(serde_json::to_string(&n).unwrap(), format!("{ok:?}"));
            let back: SafeName = serde_json::from_str(&format!("{ok:?}")).unwrap();
            assert_eq!(back, n);
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "-x",
            "_x",
            "a\\b",
            "x y",
            "é",
            &"x".repeat(129),
        ] {
            assert_eq!(SafeName::parse(bad), Err(UnsafeName(bad.to_string())));
            let e = serde_json::from_str::<SafeName>(&format!("{bad:?}")).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{bad:?} is not a safe path component")),
                "{e}"
            );
        }
    }

    #[test]
    fn an_md5_is_32_lowercase_hex_digits_and_encodes_as_its_text() {
        let hex = "0123456789abcdef0123456789abcdef";
        let m = Md5Sum::parse(hex).unwrap();
        assert!(m.is(hex) && m == hex && format!("{m}") == hex && &*m == hex);
        assert_eq!(
            Md5Sum::of_digest(&[
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]),
            m
        );
        assert_eq!(serde_json::to_string(&m).unwrap(), format!("{hex:?}"));
        for bad in [
            "",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdeg",
            "../../../../victim",
        ] {
            assert_eq!(Md5Sum::parse(bad), Err(BadMd5(bad.to_string())));
            let e = serde_json::from_str::<Md5Sum>(&format!("{bad:?}")).unwrap_err();
            assert!(e.to_string().contains(&format!("md5 {bad:?}")), "{e}");
        }
    }

    /// The journal's bincode sees the `String` each stands for, byte for byte.
    #[test]
    fn both_encode_in_bincode_as_a_string_does() {
        let cfg = bincode::config::standard();
        let name = SafeName::parse("tbl_a").unwrap();
        let md5 = Md5Sum::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            bincode::serde::encode_to_vec(&name, cfg).unwrap(),
            bincode::serde::encode_to_vec("tbl_a".to_string(), cfg).unwrap()
        );
        assert_eq!(
            bincode::serde::encode_to_vec(md5, cfg).unwrap(),
            bincode::serde::encode_to_vec(md5.to_string(), cfg).unwrap()
        );
        let bytes = bincode::serde::encode_to_vec("../x".to_string(), cfg).unwrap();
        match bincode::serde::decode_from_slice::<SafeName, _>(&bytes, cfg).unwrap_err() {
            bincode::error::DecodeError::OtherString(why) => {
                assert!(
                    why.starts_with(r#""../x" is not a safe path component"#),
                    "{why}"
                )
            }
            e => panic!("{e}"),
        }
    }
}
