//! Secrets typed so they cannot be printed: `Debug` and `Display` redact, and the bytes are
//! reachable only through `expose`, which only verification, the clients that send a token
//! (P0's, the providers') and the database connection call. They cannot be
//! compared with `==` (not constant-time; compare digests with `subtle`, as `verify` does), and
//! their memory is overwritten with zeros when they are dropped.

use std::fmt;

use zeroize::Zeroize;

/// One secret value (a webhook secret, a shared token, the P0 API key).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret's bytes, for the code that signs, compares or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Zeroize for Secret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Several secrets, newest first, accepted side by side while one is rotated out.
#[derive(Clone, Default)]
pub struct Secrets(Vec<Secret>);

impl Secrets {
    /// Splits a comma-separated list; blank items are dropped.
    pub fn from_list(list: &str) -> Self {
        Secrets(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.iter()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} × ***)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only while `T` has no `PartialEq`: with one, both impls below apply and the
    /// `_` in `not_comparable` is ambiguous (the trick `static_assertions::assert_not_impl_any`
    /// uses). `==` on a secret would be a comparison that is not constant-time.
    trait AmbiguousIfComparable<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfComparable<()> for T {}
    impl<T: ?Sized + PartialEq> AmbiguousIfComparable<u8> for T {}

    #[test]
    fn secrets_cannot_be_compared_with_eq() {
        <Secret as AmbiguousIfComparable<_>>::check();
        <Secrets as AmbiguousIfComparable<_>>::check();
    }

    #[test]
    fn dropped_secrets_are_zeroized() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroized_on_drop::<Secret>();
        let mut s = Secret::new("hunter2");
        s.zeroize();
        assert_eq!(s.expose(), "");
    }

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        let list = Secrets::from_list("a-secret, ,b-secret");
        assert_eq!(list.len(), 2);
        assert!(!format!("{list:?}").contains("secret"));
    }
}
