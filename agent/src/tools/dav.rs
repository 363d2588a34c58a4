//! WebDAV (RFC 4918) as the drive and CalDAV tools use it: PROPFIND/REPORT answers
//! (`207 Multi-Status` XML, read with namespaces into a small tree), GET/PUT/MOVE/DELETE/MKCOL,
//! HTTP basic authentication with the configured account (the password a sealed credential),
//! and paths that are always below the configured collection: hrefs from the server that lead
//! elsewhere are ignored, `..` is refused before a request is made.
//!
//! Errors name the path (never the password) and what to do.

use bytes::Bytes;
use http::{Method, StatusCode};
use quick_xml::{NsReader, events::Event, name::ResolveResult};

use crate::{
    dingtalk::http::{HttpClient, HttpError, HttpResponse},
    secret::Secret,
};

pub const DAV: &str = "DAV:";
pub const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";

/// An XML element: namespace, local name, its direct text and its child elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub ns: String,
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    pub fn child(&self, ns: &str, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    pub fn children<'a>(&'a self, ns: &'a str, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(ns, name))
    }

    /// The first descendant (or self) named so.
    pub fn find(&self, ns: &str, name: &str) -> Option<&Element> {
        if self.is(ns, name) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(ns, name))
    }
}

/// Deepest nesting accepted (DAV answers are a handful of levels deep).
const MAX_DEPTH: usize = 64;

fn entity(name: &str) -> Option<char> {
    match name {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => {
            let n = name.strip_prefix('#')?;
            let code = match n.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => n.parse().ok()?,
            };
            char::from_u32(code)
        }
    }
}

/// Parse an XML document into its root element; `None` if it is not well-formed XML.
pub fn parse_xml(text: &str) -> Option<Element> {
    let mut reader = NsReader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    let open = |res: ResolveResult, local: &str| Element {
        ns: match res {
            ResolveResult::Bound(ns) => ns.as_ref().to_owned(),
            _ => String::new(),
        },
        name: local.to_owned(),
        ..Default::default()
    };
    loop {
        let (res, event) = reader.read_resolved_event().ok()?;
        match event {
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return None;
                }
                stack.push(open(res, e.local_name().as_ref()));
            }
            Event::Empty(e) => {
                let el = open(res, e.local_name().as_ref());
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack.pop()?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml_content(quick_xml::XmlVersion::Implicit1_0));
                }
            }
            Event::CData(c) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&c.into_inner());
                }
            }
            Event::GeneralRef(r) => {
                let c = entity(&r.into_inner())?;
                if let Some(top) = stack.last_mut() {
                    top.text.push(c);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return None;
    }
    root
}

/// Standard base64 with padding (HTTP basic credentials).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(T[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-decode an href (invalid escapes are kept as written).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A relative path's parts, refusing what could leave the collection.
pub fn parts(path: &str) -> Result<Vec<&str>, String> {
    if path.chars().any(|c| c.is_control()) {
        return Err("the path contains a control character".into());
    }
    let parts: Vec<&str> = path.split(['/', '\\']).filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err("`..` is not allowed in paths".into());
    }
    Ok(parts)
}

#[derive(Debug, thiserror::Error)]
pub enum DavError {
    #[error("the server refused the account (401): check [{0}] username and password")]
    Unauthorized(&'static str),
    #[error("the server does not allow this for the account (403 on {0})")]
    Forbidden(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} changed meanwhile; look at it again")]
    Changed(String),
    #[error("the server refused {method} {path} ({status})")]
    Refused { method: String, path: String, status: u16 },
    #[error("{0}; name a path inside the drive")]
    BadPath(String),
    #[error("the server's answer to {0} is not WebDAV XML")]
    Shape(String),
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// One resource of a PROPFIND answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Below the collection, without leading or trailing `/` ("" for the collection itself).
    pub path: String,
    pub dir: bool,
    pub size: Option<u64>,
    pub modified: Option<String>,
    pub etag: Option<String>,
    pub content_type: Option<String>,
}

/// A response element of a multistatus answer: its path below the collection and the
/// properties of its `200 OK` propstat.
pub struct Response<'a> {
    pub path: String,
    pub prop: Option<&'a Element>,
}

pub struct Dav {
    http: HttpClient,
    /// The collection URL, ending in `/`.
    base: String,
    /// Its path part (`/remote.php/dav/files/alice/`).
    base_path: String,
    auth: Option<Secret>,
    /// The configuration table, for error messages.
    table: &'static str,
}

impl Dav {
    pub fn new(http: HttpClient, base: &str, username: &str, password: Option<&Secret>, table: &'static str) -> Self {
        let base = format!("{}/", base.trim_end_matches('/'));
        let base_path = base.parse::<http::Uri>().map(|u| u.path().to_owned()).unwrap_or_else(|_| "/".into());
        let auth = (!username.is_empty()).then(|| {
            let pass = password.map(Secret::expose).unwrap_or("");
            Secret::new(format!("Basic {}", base64(format!("{username}:{pass}").as_bytes())))
        });
        Dav { http, base, base_path: decode(&base_path), auth, table }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The URL of a relative path (each part percent-encoded); a folder's ends in `/`.
    pub fn url(&self, path: &str, dir: bool) -> Result<String, String> {
        let parts = parts(path)?;
        let mut url = self.base.clone();
        url.push_str(&parts.iter().map(|p| crate::dingtalk::openapi::encode(p)).collect::<Vec<_>>().join("/"));
        if dir && !parts.is_empty() {
            url.push('/');
        }
        Ok(url)
    }

    /// The path below the collection of an href, or `None` when it leads elsewhere.
    pub fn relative(&self, href: &str) -> Option<String> {
        let path = match href.find("://") {
            Some(i) => &href[href[i + 3..].find('/').map(|j| i + 3 + j)?..],
            None => href,
        };
        let path = decode(path);
        let base = self.base_path.trim_end_matches('/');
        let rest = path.strip_prefix(base)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let rest = rest.trim_matches('/');
        parts(rest).ok()?;
        Some(rest.to_owned())
    }

    /// The headers every request carries (the login), with `headers`.
    fn with_auth<'a>(&'a self, headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &self.auth {
            all.push(("authorization", a.expose()));
        }
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("accept")) {
            all.push(("accept", "*/*"));
        }
        all
    }

    /// PUT the file at `path` to `url`, streamed; `idle` as [`HttpClient::send_file`].
    pub async fn put_file(&self, url: &str, path: &std::path::Path, idle: std::time::Duration) -> Result<(), DavError> {
        let all = self.with_auth(&[("content-type", "application/octet-stream")]);
        let resp = self.http.send_file(Method::PUT, url, &all, path, idle, 64 * 1024).await?;
        self.judged(&Method::PUT, url, &[], resp).map(drop)
    }

    /// GET `url` into the file at `to`, streamed, up to `max` bytes.
    pub async fn get_file(
        &self,
        url: &str,
        to: &std::path::Path,
        idle: std::time::Duration,
        max: u64,
    ) -> Result<(), DavError> {
        let resp = self.http.get_to_file(url, &self.with_auth(&[]), to, idle, max).await?;
        self.judged(&Method::GET, url, &[], resp).map(drop)
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max: usize,
    ) -> Result<HttpResponse, DavError> {
        let all = self.with_auth(headers);
        let resp = self.http.request(method.clone(), url, &all, body, max).await?;
        self.judged(&method, url, headers, resp)
    }

    /// A response as a result: a success (or a multistatus), else what it means.
    fn judged(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, &str)],
        resp: HttpResponse,
    ) -> Result<HttpResponse, DavError> {
        let shown = self.shown(url);
        match resp.status {
            s if s.is_success() || s == StatusCode::MULTI_STATUS => Ok(resp),
            StatusCode::UNAUTHORIZED => Err(DavError::Unauthorized(self.table)),
            StatusCode::FORBIDDEN => Err(DavError::Forbidden(shown)),
            StatusCode::NOT_FOUND | StatusCode::GONE => Err(DavError::NotFound(shown)),
            StatusCode::PRECONDITION_FAILED
                if method.as_str() == "MOVE"
                    || headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("if-none-match")) =>
            {
                Err(DavError::Exists(shown))
            }
            StatusCode::PRECONDITION_FAILED => Err(DavError::Changed(shown)),
            s => Err(DavError::Refused { method: method.to_string(), path: shown, status: s.as_u16() }),
        }
    }

    /// A URL as errors show it: the path below the collection.
    pub fn shown(&self, url: &str) -> String {
        let p = self.relative(url).unwrap_or_else(|| crate::dingtalk::http::redact(url));
        if p.is_empty() { "the top folder".into() } else { p }
    }

    /// A multistatus request (PROPFIND, REPORT) and its parsed answer.
    pub async fn multistatus(
        &self,
        method: &str,
        url: &str,
        depth: &str,
        body: &str,
        max: usize,
    ) -> Result<Element, DavError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| DavError::Shape(url.into()))?;
        let headers = [
            ("depth", depth),
            ("content-type", "application/xml; charset=utf-8"),
            ("accept", "application/xml, text/xml"),
        ];
        let resp = self.send(method, url, &headers, Bytes::from(body.to_owned()), max).await?;
        let text = std::str::from_utf8(&resp.body).map_err(|_| DavError::Shape(self.shown(url)))?;
        let root =
            parse_xml(text).filter(|r| r.is(DAV, "multistatus")).ok_or_else(|| DavError::Shape(self.shown(url)))?;
        Ok(root)
    }

    /// The responses of a multistatus answer that lie below the collection.
    pub fn responses<'a>(&self, root: &'a Element) -> Vec<Response<'a>> {
        root.children(DAV, "response")
            .filter_map(|r| {
                let path = self.relative(r.child(DAV, "href")?.text.trim())?;
                let prop = r
                    .children(DAV, "propstat")
                    .find(|ps| ps.child(DAV, "status").is_some_and(|s| s.text.contains(" 200 ")))
                    .and_then(|ps| ps.child(DAV, "prop"));
                Some(Response { path, prop })
            })
            .collect()
    }

    /// PROPFIND of `path` (a folder: with `Depth: 1` its members too).
    pub async fn propfind(&self, path: &str, depth: u8, max: usize) -> Result<Vec<Entry>, DavError> {
        let url = self.url(path, depth > 0).map_err(DavError::BadPath)?;
        let body = r#"<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getcontentlength/><d:getlastmodified/><d:getetag/><d:getcontenttype/></d:prop></d:propfind>"#;
        let root = self.multistatus("PROPFIND", &url, if depth > 0 { "1" } else { "0" }, body, max).await?;
        let text = |p: Option<&Element>, name: &str| {
            p.and_then(|p| p.child(DAV, name)).map(|e| e.text.trim().to_owned()).filter(|t| !t.is_empty())
        };
        Ok(self
            .responses(&root)
            .into_iter()
            .map(|r| Entry {
                dir: r
                    .prop
                    .and_then(|p| p.child(DAV, "resourcetype"))
                    .is_some_and(|t| t.child(DAV, "collection").is_some()),
                size: text(r.prop, "getcontentlength").and_then(|s| s.parse().ok()),
                modified: text(r.prop, "getlastmodified"),
                etag: text(r.prop, "getetag"),
                content_type: text(r.prop, "getcontenttype"),
                path: r.path,
            })
            .collect())
    }

    /// The entry at `path`, or `None` when nothing is there.
    pub async fn stat(&self, path: &str) -> Result<Option<Entry>, DavError> {
        match self.propfind(path, 0, 256 * 1024).await {
            Ok(mut entries) => Ok(entries.drain(..).next()),
            Err(DavError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistatus_reads_with_any_prefix_entities_and_cdata() {
        let xml = r#"<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
            <D:response><D:href>/dav/a%20b/R&amp;D.txt</D:href><D:propstat><D:prop>
            <D:getcontentlength>12</D:getcontentlength><C:calendar-data><![CDATA[BEGIN:VCALENDAR<x>]]></C:calendar-data>
            </D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>"#;
        let root = parse_xml(xml).expect("well-formed");
        assert!(root.is(DAV, "multistatus"));
        let href = root.find(DAV, "href").expect("href");
        assert_eq!(decode(&href.text), "/dav/a b/R&D.txt");
        assert_eq!(root.find(CALDAV, "calendar-data").map(|e| e.text.as_str()), Some("BEGIN:VCALENDAR<x>"));
        let plain =
            parse_xml(r#"<multistatus xmlns="DAV:"><response><href>x&#x4e2d;&#25991;</href></response></multistatus>"#)
                .expect("default namespace");
        assert_eq!(plain.find(DAV, "href").map(|e| e.text.as_str()), Some("x中文"));
        for bad in ["<a><b></a>", "<a>&nosuch;</a>", "<a>", ""] {
            assert!(parse_xml(bad).is_none(), "{bad:?}");
        }
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert!(parse_xml(&deep).is_none(), "nesting is bounded");
    }

    #[test]
    fn paths_stay_below_the_collection() {
        let http = HttpClient::new(crate::dingtalk::http::tls_config(), std::time::Duration::from_secs(1));
        let dav = Dav::new(http, "https://cloud.example/remote.php/dav/files/alice", "alice", None, "tools.drive");
        assert_eq!(
            dav.url("reports/Q3 报告.pdf", false).as_deref(),
            Ok("https://cloud.example/remote.php/dav/files/alice/reports/Q3%20%E6%8A%A5%E5%91%8A.pdf")
        );
        assert_eq!(dav.url("", true).as_deref(), Ok("https://cloud.example/remote.php/dav/files/alice/"));
        assert!(dav.url("reports/../../bob", false).is_err());
        assert_eq!(dav.relative("/remote.php/dav/files/alice/reports/").as_deref(), Some("reports"));
        assert_eq!(dav.relative("https://cloud.example/remote.php/dav/files/alice/a%20b").as_deref(), Some("a b"));
        assert_eq!(dav.relative("/remote.php/dav/files/alice/").as_deref(), Some(""));
        assert_eq!(dav.relative("/remote.php/dav/files/alicex/secret"), None);
        assert_eq!(dav.relative("/remote.php/dav/files/bob/secret"), None);
        assert_eq!(dav.relative("/remote.php/dav/files/alice/%2e%2e/bob"), None);
        assert_eq!(base64(b"bob:pw456"), "Ym9iOnB3NDU2");
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
