"""Keys: vyre byte compatibility, the seed's key tests, and validation."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vyre_sqlcache import CURRENT_KEY_VERSION, DeviceFingerprint, FeatureFlags, PipelineCacheKey

# Vectors computed with Debian's `b3sum` (an implementation independent of the
# `blake3` package) over byte strings assembled with printf from the format doc.
NVIDIA_DRIVER_DIGEST = "6fcda3014e4828040f8d7edd373d7a1dc2dfff0b3001b58723762c04ab872622"
RADV_DRIVER_DIGEST = "9797572dcf663cfcf09308fb2c9bca44616cc88420c54063539dcd9fee9619c3"
NVIDIA_KEY_FOR_PROGRAM_0_TO_31 = "356209603243935f4fd446254292e69e0f2d07f11fd4fccd04364e21c50ef5fd"


def key(**fields: Any) -> PipelineCacheKey:
    values: dict[str, Any] = {
        "shader_hash": bytes([1]) * 32,
        "bind_group_layout_hash": bytes([2]) * 32,
        "push_constant_size": 0,
        "workgroup_size": (1, 1, 1),
        "feature_flags": FeatureFlags(0),
        "backend": "backend-a",
    }
    values.update(fields)
    return PipelineCacheKey(**values)


# -- vyre byte compatibility ------------------------------------------------------------


def test_fingerprint_from_parts_matches_fixed_vectors() -> None:
    nvidia = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
    radv = DeviceFingerprint.from_parts(0x1002, 0x744C, "mesa 24.0.5", "radv")
    assert nvidia.driver_digest.hex() == NVIDIA_DRIVER_DIGEST
    assert radv.driver_digest.hex() == RADV_DRIVER_DIGEST
    assert (nvidia.vendor, nvidia.device) == (0x10DE, 0x2684)


def test_cache_key_matches_fixed_vector() -> None:
    nvidia = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
    assert nvidia.cache_key(bytes(range(32))).hex() == NVIDIA_KEY_FOR_PROGRAM_0_TO_31


@given(
    vendor=st.integers(0, 2**32 - 1),
    device=st.integers(0, 2**32 - 1),
    revision=st.text(),
    extra=st.text(),
    program=st.binary(min_size=32, max_size=32),
)
def test_derivation_matches_independent_assembly(
    vendor: int, device: int, revision: str, extra: str, program: bytes
) -> None:
    fingerprint = DeviceFingerprint.from_parts(vendor, device, revision, extra)
    driver = blake3.blake3(
        b"vyre-pipeline-device-fingerprint-v1\x00"
        + revision.encode("utf-8", "surrogatepass")
        + b"\x00extra\x00"
        + extra.encode("utf-8", "surrogatepass")
    ).digest()
    assert fingerprint.driver_digest == driver
    expected = blake3.blake3(
        b"vyre-disk-pipeline-cache-key-v1\x00program\x00"
        + program
        + b"\x00vendor\x00"
        + struct.pack("<I", vendor)
        + b"\x00device\x00"
        + struct.pack("<I", device)
        + b"\x00driver\x00"
        + driver
    ).digest()
    assert fingerprint.cache_key(program) == expected
    assert fingerprint.cache_key(program.hex()) == expected


@pytest.mark.parametrize(
    ("flag", "bit"),
    [
        (FeatureFlags.SUBGROUP_OPS, 0),
        (FeatureFlags.F16, 1),
        (FeatureFlags.BF16, 2),
        (FeatureFlags.TENSOR_CORES, 3),
        (FeatureFlags.ASYNC_COMPUTE, 4),
        (FeatureFlags.PUSH_CONSTANTS, 5),
        (FeatureFlags.INDIRECT_DISPATCH, 6),
        (FeatureFlags.SPECULATIVE, 7),
        (FeatureFlags.PERSISTENT_THREAD, 8),
    ],
)
def test_feature_flag_bits_match_vyre(flag: FeatureFlags, bit: int) -> None:
    assert int(flag) == 1 << bit


@given(st.integers(0, 2**32 - 1))
def test_unknown_flag_bits_are_kept(bits: int) -> None:
    assert int(key(feature_flags=bits).feature_flags) == bits
    assert int(FeatureFlags(bits)) == bits


# -- the seed's tests (pipeline_cache_key_tests) -------------------------------------


def test_different_workgroup_size_differs() -> None:
    assert key(workgroup_size=(64, 1, 1)) != key(workgroup_size=(128, 1, 1))


def test_different_feature_flags_differ() -> None:
    assert key() != key(feature_flags=FeatureFlags.SUBGROUP_OPS)


def test_different_backend_id_differs() -> None:
    assert key(backend="backend-a") != key(backend="backend-b")


def test_flag_containment_is_correct() -> None:
    flags = FeatureFlags.SUBGROUP_OPS | FeatureFlags.F16
    assert flags.contains(FeatureFlags.SUBGROUP_OPS)
    assert flags.contains(FeatureFlags.F16)
    assert not flags.contains(FeatureFlags.TENSOR_CORES)


def test_version_is_current() -> None:
    assert key().version == CURRENT_KEY_VERSION


# -- entry keys ---------------------------------------------------------------------------

FIELD_CHANGES: list[dict[str, Any]] = [
    {"shader_hash": bytes([9]) * 32},
    {"bind_group_layout_hash": bytes([9]) * 32},
    {"push_constant_size": 16},
    {"workgroup_size": (1, 1, 2)},
    {"feature_flags": FeatureFlags.F16},
    {"feature_flags": 1 << 31},
    {"backend": "backend-b"},
    {"backend": "backend-a\x00"},
    {"version": CURRENT_KEY_VERSION + 1},
]


@pytest.mark.parametrize("change", FIELD_CHANGES, ids=lambda c: next(iter(c)))
def test_every_key_field_changes_the_entry_key(change: dict[str, Any]) -> None:
    fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
    assert key(**change).entry_key(fingerprint) != key().entry_key(fingerprint)


@pytest.mark.parametrize(
    "other",
    [
        DeviceFingerprint.from_parts(2, 2, "r"),
        DeviceFingerprint.from_parts(1, 3, "r"),
        DeviceFingerprint.from_parts(1, 2, "r", "x"),
    ],
)
def test_fingerprint_changes_the_entry_key(other: DeviceFingerprint) -> None:
    base = DeviceFingerprint.from_parts(1, 2, "r")
    assert key().entry_key(other) != key().entry_key(base)


def test_entry_key_is_stable_and_hex_hashes_are_equivalent() -> None:
    fingerprint = DeviceFingerprint.from_parts(1, 2, "r")
    as_hex = key(shader_hash=(bytes([1]) * 32).hex(), bind_group_layout_hash="02" * 32)
    assert as_hex == key()
    assert as_hex.entry_key(fingerprint) == key().entry_key(fingerprint)
    assert hash(as_hex) == hash(key())


def test_keys_are_immutable() -> None:
    k = key()
    with pytest.raises(AttributeError):
        k.backend = "other"  # type: ignore[misc]


# -- validation: the field, the value and what is allowed ------------------------------

BAD_KEY_FIELDS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"shader_hash": b"\x00" * 31}, ValueError, "shader_hash must be exactly 32 bytes, got 31"),
    ({"shader_hash": "zz" * 32}, ValueError, "shader_hash"),
    ({"shader_hash": "ab" * 31}, ValueError, "shader_hash must be 64 hex characters"),
    # An odd length is a length error, not "not hex" (bytes.fromhex's complaint).
    ({"shader_hash": "a" * 63}, ValueError, "64 hex characters (32 bytes), got 63 characters"),
    ({"shader_hash": "zz" * 32}, ValueError, "which is not hex"),
    ({"shader_hash": 5}, TypeError, "shader_hash must be 32 bytes"),
    ({"bind_group_layout_hash": b""}, ValueError, "bind_group_layout_hash"),
    ({"push_constant_size": -1}, ValueError, "push_constant_size must be in 0..4294967295"),
    ({"push_constant_size": 2**32}, ValueError, "got 4294967296"),
    ({"push_constant_size": 1.5}, TypeError, "push_constant_size must be an int"),
    ({"push_constant_size": True}, TypeError, "push_constant_size"),
    ({"workgroup_size": (1, 1)}, ValueError, "workgroup_size must have exactly 3 items"),
    ({"workgroup_size": (1, 1, -1)}, ValueError, "workgroup_size[2] must be in 0..4294967295"),
    ({"workgroup_size": 64}, TypeError, "workgroup_size must be a sequence"),
    ({"workgroup_size": "abc"}, TypeError, "workgroup_size"),
    ({"feature_flags": 2**32}, ValueError, "feature_flags must be in 0..4294967295"),
    ({"feature_flags": "F16"}, TypeError, "feature_flags"),
    ({"backend": ""}, ValueError, "backend must be a non-empty str"),
    ({"backend": b"vulkan"}, TypeError, "backend must be a non-empty str"),
    ({"backend": "\ud800"}, ValueError, "lone surrogate"),
    ({"version": -1}, ValueError, "version must be in 0..4294967295"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_KEY_FIELDS)
def test_bad_key_fields_are_refused_with_a_clear_message(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        key(**change)
    assert message in str(info.value)


BAD_FINGERPRINTS: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: DeviceFingerprint(-1, 0, b"\x00" * 32), ValueError, "vendor must be in"),
    (lambda: DeviceFingerprint(0, 2**32, b"\x00" * 32), ValueError, "device must be in"),
    (lambda: DeviceFingerprint(0, 0, b"\x00" * 8), ValueError, "driver_digest"),
    (lambda: DeviceFingerprint.from_parts(0, 0, 550), TypeError, "revision must be a str"),
    (lambda: DeviceFingerprint.from_parts(0, 0, "r", None), TypeError, "revision_extra"),
    (lambda: DeviceFingerprint.from_parts(1, 2, "r").cache_key(b"x"), ValueError, "program_digest"),
]


@pytest.mark.parametrize(("build", "error", "message"), BAD_FINGERPRINTS)
def test_bad_fingerprints_are_refused(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()
