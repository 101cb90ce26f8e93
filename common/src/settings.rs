//! Reading settings from the environment (or any lookup, in tests): trimmed values, defaults,
//! and one clear error naming the variable when a value cannot be used.

use std::net::SocketAddr;
use std::time::Duration;

/// A setting that is missing or cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Settings read through a lookup function (`std::env::var` in production).
pub struct Settings<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Settings<F> {
    pub fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// The trimmed value; unset and empty are the same.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty())
    }

    pub fn text(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    pub fn required(&self, name: &str) -> Result<String, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError(format!("{name} is required")))
    }

    /// A non-negative integer.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => {
                value.parse().map_err(|_| ConfigError(format!("{name} must be a non-negative integer, got {value:?}")))
            }
        }
    }

    /// An integer above zero.
    pub fn positive(&self, name: &str, default: u64) -> Result<u64, ConfigError> {
        match self.number(name, default)? {
            0 => Err(ConfigError(format!("{name} must be greater than 0"))),
            value => Ok(value),
        }
    }

    pub fn seconds(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.positive(name, default)?))
    }

    pub fn millis(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.positive(name, default)?))
    }

    /// A positive integer that fits `T` (sizes, counts).
    pub fn size<T: TryFrom<u64>>(&self, name: &str, default: u64) -> Result<T, ConfigError> {
        T::try_from(self.positive(name, default)?).map_err(|_| ConfigError(format!("{name} is too large")))
    }

    pub fn address(&self, name: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let value = self.text(name, default);
        value.parse().map_err(|_| ConfigError(format!("{name} must be host:port, got {value:?}")))
    }

    /// An optional URL with one of `schemes` (such as `"redis"`).
    pub fn url(&self, name: &str, schemes: &[&str]) -> Result<Option<String>, ConfigError> {
        let Some(url) = self.get(name) else { return Ok(None) };
        if !schemes.iter().any(|scheme| url.starts_with(&format!("{scheme}://"))) {
            let expected: Vec<String> = schemes.iter().map(|scheme| format!("{scheme}://")).collect();
            return Err(ConfigError(format!("{name} must start with {}", expected.join(" or "))));
        }
        Ok(Some(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &'static [(&'static str, &'static str)]) -> Settings<impl Fn(&str) -> Option<String>> {
        Settings::new(move |name: &str| vars.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned()))
    }

    #[test]
    fn values_are_trimmed_defaulted_and_checked() {
        let settings = settings(&[("A", "  7 "), ("EMPTY", " "), ("ZERO", "0"), ("WORD", "x"), ("URL", "http://h")]);
        assert_eq!(settings.positive("A", 1).expect("7"), 7);
        assert_eq!(settings.positive("EMPTY", 3).expect("default"), 3);
        assert!(settings.positive("ZERO", 1).expect_err("zero").to_string().starts_with("ZERO must be"));
        assert!(settings.number("WORD", 1).expect_err("word").to_string().starts_with("WORD must be"));
        assert_eq!(settings.required("MISSING").expect_err("missing").to_string(), "MISSING is required");
        let error = settings.url("URL", &["redis", "rediss"]).expect_err("scheme");
        assert_eq!(error.to_string(), "URL must start with redis:// or rediss://");
        assert!(settings.address("WORD", "0.0.0.0:1").is_err());
        assert_eq!(settings.size::<u8>("A", 1).expect("fits"), 7u8);
    }
}
