"""kracauer.routing: names to hosts, in the documented matching order."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kracauer.config import Fallback, Route
from kracauer.routing import MAX_NAME_LENGTH, Router, Target, normalize_name

V6 = ipaddress.IPv6Address
EXACT = V6("2001:db8::1")
WILD = V6("2001:db8::2")
LONG_WILD = V6("2001:db8::3")
REGEX_A = V6("2001:db8::4")
REGEX_B = V6("2001:db8::5")
BACK = V6("2001:db8::99")
FALLBACK = Fallback(BACK)


def router(*routes: tuple[str, ipaddress.IPv6Address] | Route, fallback: Fallback | None = FALLBACK) -> Router:
    return Router([r if isinstance(r, Route) else Route(r[0], r[1]) for r in routes], fallback)


def host_for(r: Router, name: str | None, port: int = 443):
    target = r.lookup(name, port)
    return None if target is None else target.host


# -- normalize_name -------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("www.example.com", "www.example.com"),
    ("WWW.Example.COM", "www.example.com"),
    ("www.example.com.", "www.example.com"),
    ("www.example.com..", "www.example.com."),
    ("", ""),
    (".", ""),
])
def test_normalize_name_lowercases_and_removes_one_trailing_dot(name, expected):
    assert normalize_name(name) == expected


def test_normalize_name_folds_only_ascii_letters():
    # U+212A KELVIN SIGN lowercases to ASCII "k" with str.lower(); DNS does not.
    assert normalize_name("\u212aRACAUER.example") == "\u212aracauer.example"


# -- exact names ----------------------------------------------------------------------

def test_exact_name_matches_and_reports_the_route_as_written():
    r = router(("WWW.Example.com.", EXACT))
    assert r.lookup("www.example.com", 443) == Target(EXACT, 443, "WWW.Example.com.")


@pytest.mark.parametrize("name", ["www.example.com", "WWW.EXAMPLE.COM", "www.example.com.", "Www.Example.Com."])
def test_exact_match_ignores_case_and_one_trailing_dot(name):
    assert host_for(router(("www.example.com", EXACT)), name) == EXACT


def test_exact_name_does_not_match_subdomains_or_parents():
    r = router(("example.com", EXACT), fallback=None)
    assert r.lookup("www.example.com", 443) is None
    assert r.lookup("com", 443) is None


def test_exact_beats_wildcard_and_regex_whatever_the_file_order():
    r = router(("~.*", REGEX_A), ("*.example.com", WILD), ("www.example.com", EXACT))
    assert host_for(r, "www.example.com") == EXACT
    assert host_for(r, "mail.example.com") == WILD


# -- wildcards ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.example.com", "a.b.example.com", "x.y.z.example.com", "A.EXAMPLE.COM."])
def test_wildcard_matches_subdomains_at_any_depth(name):
    assert host_for(router(("*.example.com", WILD)), name) == WILD


def test_wildcard_does_not_match_the_bare_domain():
    r = router(("*.example.com", WILD), fallback=None)
    assert r.lookup("example.com", 443) is None
    assert r.lookup("example.com.", 443) is None


def test_wildcard_does_not_match_a_name_that_only_ends_with_the_suffix():
    r = router(("*.example.com", WILD), fallback=None)
    assert r.lookup("badexample.com", 443) is None
    assert r.lookup("example.com.evil", 443) is None


def test_longer_wildcard_beats_shorter_whatever_the_file_order():
    r = router(("*.com", V6("2001:db8::7")), ("*.example.com", WILD), ("*.b.example.com", LONG_WILD))
    assert host_for(r, "a.b.example.com") == LONG_WILD
    assert host_for(r, "x.a.b.example.com") == LONG_WILD
    assert host_for(r, "b.example.com") == WILD
    assert host_for(r, "a.example.com") == WILD
    assert host_for(r, "example.com") == V6("2001:db8::7")


def test_wildcard_and_exact_route_for_the_bare_domain_work_together():
    r = router(("*.example.com", WILD), ("example.com", EXACT))
    assert host_for(r, "example.com") == EXACT
    assert host_for(r, "www.example.com") == WILD


def test_wildcard_beats_regex():
    r = router(("~.*\\.example\\.com", REGEX_A), ("*.example.com", WILD))
    assert host_for(r, "a.example.com") == WILD


def test_wildcard_target_names_the_wildcard_route():
    assert router(("*.Example.org", WILD)).lookup("a.example.org", 80) == Target(WILD, 80, "*.Example.org")


# -- regular expressions ----------------------------------------------------------

def test_regexes_are_tried_in_file_order():
    r = router(("~api-.*", REGEX_A), ("~api-[0-9]+\\.example\\.net", REGEX_B))
    assert host_for(r, "api-7.example.net") == REGEX_A
    r = router(("~api-[0-9]+\\.example\\.net", REGEX_B), ("~api-.*", REGEX_A))
    assert host_for(r, "api-7.example.net") == REGEX_B
    assert host_for(r, "api-x.example.net") == REGEX_A


def test_regex_must_match_the_whole_name():
    r = router(("~api", REGEX_A), fallback=None)
    assert r.lookup("api.example.net", 443) is None
    assert r.lookup("myapi", 443) is None
    assert r.lookup("api", 443) == Target(REGEX_A, 443, "~api")


def test_regex_is_case_insensitive_and_sees_the_normalized_name():
    r = router(("~API\\.Example\\.NET", REGEX_A), fallback=None)
    assert host_for(r, "api.example.net.") == REGEX_A
    assert host_for(r, "API.EXAMPLE.NET") == REGEX_A
    # One trailing dot is gone before the regex runs.
    assert router(("~.*\\.", REGEX_A), fallback=None).lookup("a.example.", 443) is None


def test_regex_uses_ascii_case_folding():
    r = router(("~kracauer", REGEX_A), fallback=None)
    assert r.lookup("\u212aracauer", 443) is None


def test_regex_is_skipped_for_names_longer_than_a_dns_name():
    r = router(("~a+", REGEX_A))
    assert host_for(r, "a" * MAX_NAME_LENGTH) == REGEX_A
    assert host_for(r, "a" * (MAX_NAME_LENGTH + 1)) == BACK


# -- fallback and missing names -----------------------------------------------------

def test_unmatched_name_goes_to_the_fallback():
    assert router(("www.example.com", EXACT)).lookup("other.example", 443) == Target(BACK, 443, "fallback")


def test_unmatched_name_without_fallback_is_refused():
    assert router(("www.example.com", EXACT), fallback=None).lookup("other.example", 443) is None


@pytest.mark.parametrize("name", [None, "", "."])
def test_missing_name_goes_to_the_fallback_only(name):
    # Even a catch-all regex does not take a connection that has no name.
    r = router(("~.*", REGEX_A), ("*.example.com", WILD))
    assert r.lookup(name, 443) == Target(BACK, 443, "fallback")


@pytest.mark.parametrize("name", [None, ""])
def test_missing_name_without_fallback_is_refused(name):
    assert router(("~.*", REGEX_A), fallback=None).lookup(name, 443) is None


def test_empty_router_with_fallback_sends_everything_to_the_fallback():
    r = Router([], FALLBACK)
    assert r.lookup("anything", 80) == Target(BACK, 80, "fallback")


# -- ports --------------------------------------------------------------------------

def test_route_without_port_uses_the_listener_port():
    r = router(("www.example.com", EXACT))
    assert r.lookup("www.example.com", 443).port == 443
    assert r.lookup("www.example.com", 80).port == 80


def test_route_port_overrides_the_listener_port():
    r = router(Route("www.example.com", EXACT, 8443), Route("*.example.com", WILD, 8444), Route("~x", REGEX_A, 8445))
    assert r.lookup("www.example.com", 443).port == 8443
    assert r.lookup("a.example.com", 443).port == 8444
    assert r.lookup("x", 443).port == 8445


def test_fallback_port_overrides_the_listener_port():
    assert Router([], Fallback(BACK, 8080)).lookup("x", 80) == Target(BACK, 8080, "fallback")


def test_first_of_duplicate_routes_wins():
    r = router(("a.example", EXACT), ("A.example.", WILD), ("*.b.example", WILD), ("*.B.example", LONG_WILD))
    assert host_for(r, "a.example") == EXACT
    assert host_for(r, "x.b.example") == WILD


# -- properties --------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=6).map(".".join)


@given(names, names)
def test_wildcard_matches_exactly_the_proper_subdomains(suffix, name):
    r = router(("*." + suffix, WILD), fallback=None)
    expected = name.endswith("." + suffix)
    assert (r.lookup(name, 443) is not None) == expected


@given(names, st.sampled_from([str.upper, str.lower, str.title]), st.booleans())
def test_exact_lookup_is_independent_of_case_and_trailing_dot(name, case, dot):
    r = router((name, EXACT), fallback=None)
    assert host_for(r, case(name) + ("." if dot else "")) == EXACT


def test_alpn_routes_win_for_clients_offering_the_protocol():
    from kracauer.config import Route as R
    acme = ipaddress.IPv6Address("2001:db8::ac")
    web = ipaddress.IPv6Address("2001:db8::10")
    router = Router([R("www.example.com", web), R("*.example.com", acme, alpn="acme-tls/1")], None)
    assert router.lookup("www.example.com", 443, ("acme-tls/1",)).host == acme
    assert router.lookup("www.example.com", 443, ("h2", "http/1.1")).host == web
    assert router.lookup("www.example.com", 443).host == web
    # An ALPN route still needs its name to match.
    assert router.lookup("www.example.org", 443, ("acme-tls/1",)) is None


def test_several_hosts_are_kept_in_the_target():
    from kracauer.config import Fallback as F, Route as R
    hosts = (ipaddress.IPv6Address("2001:db8::10"), ipaddress.IPv6Address("2001:db8::11"))
    router = Router([R("a.example", hosts[0], hosts=hosts)], F(hosts[1], hosts=hosts[::-1]))
    assert router.lookup("a.example", 443).hosts == hosts
    assert router.lookup("b.example", 443).hosts == hosts[::-1]
