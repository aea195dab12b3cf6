//! Image URLs of chat requests: `data:` URLs (base64) and local `file://` URLs. Nothing is
//! ever fetched from the network.

use std::path::PathBuf;

use base64::Engine as _;

use super::error::ApiError;
use carrot_runtime::pipeline::ImageSource;

/// An image from a `data:` URL (base64) or, when allowed, a local `file://` URL. Nothing is
/// ever fetched from the network.
pub fn image_source(url: &str, at: &str, file_urls: bool) -> Result<ImageSource, ApiError> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        "data" => data_url(&url[5..], at),
        "file" if file_urls => Ok(ImageSource::Path(file_url(&url[5..], at)?)),
        "file" => Err(ApiError::invalid(
            "invalid_image_url",
            format!(
                "{at}: file URLs are refused when the server listens beyond loopback; send a data URL"
            ),
        )),
        _ => {
            let shown: String = url.chars().take(40).collect();
            Err(ApiError::invalid(
                "invalid_image_url",
                format!(
                    "{at}: image URL `{shown}` is not supported: the server never fetches from the network; \
                     send the image as a data URL (data:image/png;base64,…) or a local file URL (file:///path)"
                ),
            ))
        }
    }
}

fn data_url(rest: &str, at: &str) -> Result<ImageSource, ApiError> {
    let bad =
        |why: String| ApiError::invalid("invalid_image_url", format!("{at}: bad data URL: {why}"));
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| bad("no `,` before the data".into()))?;
    let mut fields = header.split(';');
    let media = fields.next().unwrap_or_default().trim();
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err(bad(
            "only base64 data URLs are accepted (data:image/png;base64,…)".into(),
        ));
    }
    if !media.is_empty() && !media.to_ascii_lowercase().starts_with("image/") {
        return Err(bad(format!("media type `{media}` is not an image")));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| bad(format!("invalid base64: {e}")))?;
    if data.is_empty() {
        return Err(bad("the image is empty".into()));
    }
    let media = if media.is_empty() { "image" } else { media };
    Ok(ImageSource::Bytes {
        what: format!("{at} ({media}, {} bytes)", data.len()),
        data,
    })
}

/// `file:///abs/path`, `file://localhost/abs/path` or `file:/abs/path`, percent-decoded.
fn file_url(rest: &str, at: &str) -> Result<PathBuf, ApiError> {
    let bad =
        |why: &str| ApiError::invalid("invalid_image_url", format!("{at}: bad file URL: {why}"));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => {
            let slash = authority_and_path.find('/').ok_or_else(|| bad("no path"))?;
            let host = &authority_and_path[..slash];
            if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
                return Err(bad("only local files (file:///path) can be read"));
            }
            &authority_and_path[slash..]
        }
        None if rest.starts_with('/') => rest,
        None => return Err(bad("the path must be absolute (file:///path)")),
    };
    let decoded = percent_decode(path).ok_or_else(|| bad("invalid percent-encoding"))?;
    Ok(PathBuf::from(decoded))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_URL: &str = "data:image/png;base64,iVBORw0KGgo=";

    #[test]
    fn data_urls_decode_and_bad_ones_are_named() {
        let ImageSource::Bytes { data, what } =
            image_source(PNG_URL, "m", false).expect("data url")
        else {
            panic!("bytes expected")
        };
        assert_eq!(&data[1..4], b"PNG");
        assert!(what.contains("image/png"), "{what}");
        for bad in [
            "data:image/png;base64,@@@",
            "data:image/png,abc",
            "data:text/plain;base64,aGk=",
            "data:image/png;base64",
        ] {
            let err = image_source(bad, "m", false).expect_err("refused");
            assert_eq!(err.status, 400, "{bad}");
            assert!(err.message.contains("data URL"), "{err}");
        }
    }

    #[test]
    fn file_urls_are_local_and_percent_decoded() {
        let path = |u: &str| match image_source(u, "m", true) {
            Ok(ImageSource::Path(p)) => p,
            other => panic!("{u}: {other:?}"),
        };
        assert_eq!(path("file:///tmp/a%20b.png"), PathBuf::from("/tmp/a b.png"));
        assert_eq!(
            path("file://localhost/tmp/c.png"),
            PathBuf::from("/tmp/c.png")
        );
        assert!(image_source("file://server/share/c.png", "m", true).is_err());
        assert!(image_source("file:///tmp/c.png", "m", false).is_err());
    }

    #[test]
    fn network_urls_are_refused() {
        for url in [
            "http://example.com/cat.png",
            "https://example.com/cat.png",
            "ftp://x/y",
        ] {
            let err = image_source(url, "m", true).expect_err("refused");
            assert!(err.message.contains("never fetches"), "{err}");
        }
    }
}
