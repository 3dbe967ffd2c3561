"""The proxy's decisions without I/O: headers on each hop and which redirects are followed."""

from __future__ import annotations

from multidict import CIMultiDict
from yarl import URL

from kbdaemon import _redirects as rd

S3 = "https://s3.example.org/lake/t/part-0.parquet"
SIGV4 = (
    S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20260101%2Fus-east-1%2Fs3"
    "%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=300"
    "&X-Amz-SignedHeaders=host%3Brange&X-Amz-Signature=abcdef"
)
SIGV2 = S3 + "?AWSAccessKeyId=AK&Expires=1700000000&Signature=abc%3D"
UPSTREAM = URL("https://dlp.example.org/lake/t/part-0.parquet")


def decide(status: int, location: str | None, **kw: object) -> rd.Decision:
    args: dict[str, object] = {"current": UPSTREAM, "method": "GET", "visited": [UPSTREAM]}
    args.update(kw)
    return rd.decide_redirect(status=status, location=location, **args)  # type: ignore[arg-type]


def test_presigned_urls_are_recognised() -> None:
    assert rd.is_presigned(URL(SIGV4))
    assert rd.is_presigned(URL(SIGV2))
    assert not rd.is_presigned(URL(S3 + "?Signature=abc"))
    assert not rd.is_presigned(URL(S3 + "?versionId=3"))
    assert not rd.is_presigned(URL(S3))


def test_follows_each_redirect_status_to_a_presigned_url() -> None:
    for status in (301, 302, 307, 308):
        decision = decide(status, SIGV4)
        assert decision == rd.Follow(url=URL(SIGV4, encoded=True), method="GET", drop_body=False)
    assert decide(307, SIGV4, method="HEAD") == rd.Follow(
        url=URL(SIGV4, encoded=True), method="HEAD", drop_body=False
    )
    assert decide(303, SIGV2, method="PUT") == rd.Follow(
        url=URL(SIGV2, encoded=True), method="GET", drop_body=True
    )


def test_relative_location_resolves_against_the_current_url() -> None:
    decision = decide(307, "/other/key?X-Amz-Signature=abc&X-Amz-SignedHeaders=host")
    assert isinstance(decision, rd.Follow)
    assert str(decision.url).startswith("https://dlp.example.org/other/key?")


def test_other_redirects_and_statuses_pass_through() -> None:
    assert decide(307, "https://elsewhere.example.org/x") == rd.PassThrough()
    assert decide(307, None) == rd.PassThrough()
    assert decide(200, SIGV4) == rd.PassThrough()
    assert decide(304, SIGV4) == rd.PassThrough()


def test_plain_http_needs_the_allowlist() -> None:
    http = SIGV4.replace("https://", "http://")
    refused = decide(307, http)
    assert isinstance(refused, rd.RedirectError)
    assert refused.code == "InsecureRedirect"
    assert "X-Amz-Signature" not in refused.message
    assert isinstance(decide(307, http, allow_http_hosts=["s3.example.org"]), rd.Follow)
    assert isinstance(decide(307, http, allow_http_hosts=["s3.example.org:80"]), rd.Follow)
    assert isinstance(decide(307, http, allow_http_hosts=["s3.example.org:81"]), rd.RedirectError)


def test_loops_and_long_chains_are_errors() -> None:
    target = URL(SIGV4, encoded=True)
    loop = decide(307, SIGV4, current=target, visited=[UPSTREAM, target])
    assert isinstance(loop, rd.RedirectError)
    assert loop.code == "RedirectLoop"
    chain = [URL(f"https://s3.example.org/{i}") for i in range(rd.MAX_HOPS + 1)]
    too_long = decide(307, SIGV4, visited=chain)
    assert isinstance(too_long, rd.RedirectError)
    assert too_long.code == "TooManyRedirects"
    assert isinstance(decide(307, SIGV4, visited=chain[:-1]), rd.Follow)


def test_malformed_or_foreign_scheme_locations_are_errors() -> None:
    for location in (
        "http://[::1/broken?X-Amz-Signature=0",
        "ftp://s3.example.org/x?X-Amz-Signature=0",
        "https://:443/x?X-Amz-Signature=0",
    ):
        decision = decide(307, location)
        assert isinstance(decision, rd.RedirectError), location
        assert "Signature=0" not in decision.message


def test_followed_request_carries_only_signed_and_safe_headers() -> None:
    client = CIMultiDict(
        [
            ("Host", "127.0.0.1:9000"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=AK/..., Signature=secret"),
            ("X-Amz-Date", "20260101T000000Z"),
            ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
            ("X-Amz-Security-Token", "tok"),
            ("x-amz-checksum-mode", "ENABLED"),
            ("amz-sdk-invocation-id", "1"),
            ("amz-sdk-request", "attempt=1"),
            ("Range", "bytes=0-9"),
            ("If-None-Match", '"etag"'),
            ("If-Modified-Since", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("User-Agent", "Boto3"),
            ("Connection", "keep-alive"),
        ]
    )
    headers = rd.follow_headers(client, URL(SIGV4, encoded=True))
    assert sorted(headers) == ["If-Modified-Since", "If-None-Match", "Range"]
    signed_checksum = URL(S3 + "?X-Amz-Signature=a&X-Amz-SignedHeaders=host%3Bx-amz-checksum-mode")
    assert "x-amz-checksum-mode" in rd.follow_headers(client, signed_checksum)


def test_upstream_request_keeps_end_to_end_headers_only() -> None:
    client = CIMultiDict(
        [
            ("Host", "127.0.0.1:9000"),
            ("Authorization", "AWS4-HMAC-SHA256 ..."),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("Content-Length", "10"),
            ("Expect", "100-continue"),
            ("x-amz-content-sha256", "abc"),
        ]
    )
    headers = rd.upstream_headers(client)
    assert sorted(headers) == ["Authorization", "Content-Length", "x-amz-content-sha256"]


def test_response_headers_keep_what_clients_need() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Length", "10"),
            ("Content-Range", "bytes 0-9/100"),
            ("ETag", '"abc"'),
            ("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
        ]
    )
    kept = rd.response_headers(upstream)
    assert "Connection" not in kept and "Transfer-Encoding" not in kept
    assert kept["Content-Range"] == "bytes 0-9/100" and kept["Content-Encoding"] == "gzip"
    assert len(kept) == 6


def test_host_check_accepts_only_the_proxys_names() -> None:
    own = rd.own_host_names("127.0.0.1", 9000, allow_remote=False)
    assert rd.host_allowed("127.0.0.1:9000", own)
    assert rd.host_allowed("LOCALHOST:9000", own)
    assert not rd.host_allowed("attacker.example:9000", own)
    assert not rd.host_allowed("127.0.0.1:9001", own)
    assert not rd.host_allowed(None, own)
    anywhere = rd.own_host_names("0.0.0.0", 9000, allow_remote=True)
    assert rd.host_allowed("workstation.lan:9000", anywhere)


def test_redacted_urls_never_show_the_query() -> None:
    assert rd.redacted(SIGV4) == "https://s3.example.org/lake/t/part-0.parquet?…"
    assert rd.redacted(S3) == S3
    assert rd.redacted("https://user:pw@dlp.example.org/x") == "https://dlp.example.org/x"
