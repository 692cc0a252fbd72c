"""The key layout, the embedding codec and bulk writes/reads against a real server."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from encoder_service.store import (
    AsyncEmbeddingStore,
    CorruptEmbeddingError,
    EmbeddingDtype,
    EmbeddingStore,
    InvalidIdError,
    decode_embedding,
    decode_meta,
    decode_rows,
    embedding_key,
    encode_embedding,
    encode_embeddings,
    encode_meta,
    meta_key,
    state_key,
)

DIM = 64


def _matrix(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _users(n: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_codec_round_trip(dtype: EmbeddingDtype, itemsize: int) -> None:
    vector = _matrix(1)[0]
    raw = encode_embedding(vector, dtype)
    assert len(raw) == DIM * itemsize
    decoded = decode_embedding(raw, DIM, dtype)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, vector.astype(dtype).astype(np.float32))


def test_batch_encoding_matches_single_encoding() -> None:
    matrix = _matrix(5)
    assert encode_embeddings(matrix) == [encode_embedding(row) for row in matrix]


def test_decoded_vector_is_writable_copy() -> None:
    decoded = decode_embedding(encode_embedding(_matrix(1)[0]), DIM)
    decoded[0] = 42.0  # a view on the bytes value would be read-only
    assert decoded[0] == 42.0


@pytest.mark.parametrize(
    ("raw_len", "dtype"), [(DIM * 4 - 1, "float32"), (DIM * 4, "float16"), (0, "float32")]
)
def test_corrupt_length_raises(raw_len: int, dtype: EmbeddingDtype) -> None:
    with pytest.raises(CorruptEmbeddingError, match=f"{raw_len} bytes"):
        decode_embedding(bytes(raw_len), DIM, dtype)


def test_non_finite_and_float16_overflow_refused() -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode_embedding(np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode_embedding(np.full(DIM, 1e6, dtype=np.float32), "float16")


def test_unknown_dtype_refused() -> None:
    with pytest.raises(ValueError, match="unknown embedding dtype"):
        encode_embedding(np.zeros(DIM), "int8")  # type: ignore[arg-type]


def test_keys_carry_the_user_hash_tag() -> None:
    assert embedding_key("v1", "alice@x.org") == "emb:v1:{alice@x.org}"
    assert state_key("alice@x.org") == "state:{alice@x.org}"
    for user in ["alice", "b:42", "c.d-e_f"]:
        assert key_slot(embedding_key("v1", user).encode()) == key_slot(state_key(user).encode())
        assert key_slot(embedding_key("v2", user).encode()) == key_slot(state_key(user).encode())


@pytest.mark.parametrize("user", ["a}b", "{a}", "", "-lead", "a b", "x" * 129])
def test_user_ids_that_would_break_the_layout_are_refused(user: str) -> None:
    with pytest.raises(InvalidIdError):
        state_key(user)


@pytest.mark.parametrize("users", [["ok", "a}b"], ["ok", "a\nb"], ["ok\n"], [""]])
def test_batches_with_one_bad_user_id_are_refused(
    redis_client: redis.Redis, users: list[str]
) -> None:
    with pytest.raises(InvalidIdError):
        EmbeddingStore(redis_client).write_states(users, [b"s"] * len(users))
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("version", ["v*", "v:1", "v[1]", "", "v?"])
def test_versions_that_would_break_a_scan_are_refused(version: str) -> None:
    with pytest.raises(InvalidIdError):
        embedding_key(version, "alice")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_and_read_10k_embeddings_exactly(
    redis_client: redis.Redis, dtype: EmbeddingDtype
) -> None:
    store = EmbeddingStore(redis_client)
    users, matrix = _users(10_000), _matrix(10_000)
    assert store.write_embeddings("v1", users, matrix, dtype=dtype) == 10_000
    raws = store.read_embeddings("v1", users)
    decoded = [decode_embedding(raw, DIM, dtype) for raw in raws if raw is not None]
    assert len(decoded) == 10_000
    np.testing.assert_array_equal(np.stack(decoded), matrix.astype(dtype).astype(np.float32))


def test_stored_keys_follow_the_layout(redis_client: redis.Redis) -> None:
    store = EmbeddingStore(redis_client)
    users = _users(50)
    store.write_embeddings("v1", users, _matrix(50), batch_size=7)
    stored = {key.decode() for key in redis_client.scan_iter(count=1000)}
    assert stored == {f"emb:v1:{{{u}}}" for u in users}


def test_missing_users_read_as_none(redis_client: redis.Redis) -> None:
    store = EmbeddingStore(redis_client)
    store.write_embeddings("v1", ["a"], _matrix(1))
    raws = store.read_embeddings("v1", ["nobody", "a", "ghost"])
    assert raws[0] is None and raws[2] is None and raws[1] is not None


def test_mismatched_lengths_refused(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="3 user ids but 2 embeddings"):
        EmbeddingStore(redis_client).write_embeddings("v1", _users(3), _matrix(2))


def test_states_round_trip_and_scan(redis_client: redis.Redis) -> None:
    store = EmbeddingStore(redis_client)
    users = _users(2500, "s")
    blobs = [f"state-{u}".encode() * 3 for u in users]
    assert store.write_states(users, blobs) == 2500
    store.write_embeddings("v1", users[:10], _matrix(10))
    assert store.read_states([*users, "nobody"]) == [*blobs, None]
    assert sorted(set(store.iter_state_users(match_count=100))) == sorted(users)


def test_delete_version_removes_only_that_version(redis_client: redis.Redis) -> None:
    store = EmbeddingStore(redis_client)
    users = _users(3000)
    for version in ("v1", "v10", "v2"):
        store.write_embeddings(version, users, _matrix(3000))
    store.write_states(users, [b"s"] * len(users))
    assert store.delete_version("v1") == 3000
    assert store.count_embeddings("v1") == 0
    assert store.read_embeddings("v1", users[:5]) == [None] * 5
    assert store.count_embeddings("v10") == 3000
    assert store.count_embeddings("v2") == 3000
    assert len(list(store.iter_state_users())) == 3000


async def test_async_reads_match_sync_writes(
    redis_client: redis.Redis, async_redis_client: redis.asyncio.Redis
) -> None:
    users, matrix = _users(100), _matrix(100)
    EmbeddingStore(redis_client).write_embeddings("v1", users, matrix)
    redis_client.set(meta_key("u7"), encode_meta(12.5, {"events:{0}": "1-0"}))
    store = AsyncEmbeddingStore(async_redis_client)
    raw, meta = await store.read_embedding("v1", "u7")
    assert raw is not None
    np.testing.assert_array_equal(decode_embedding(raw, DIM), matrix[7])
    assert decode_meta(meta) == (12.5, {"events:{0}": "1-0"})
    assert await store.read_embedding("v1", "nobody") == (None, None)
    raws, metas = await store.read_batch("v1", [*users, "nobody"], with_meta=True)
    assert raws == [*encode_embeddings(matrix), None]
    assert metas is not None and len(metas) == len(raws)
    assert decode_meta(metas[7])[0] == 12.5 and metas[8] is None and metas[-1] is None
    assert await store.read_batch("v1", ["u3", "nobody"]) == (
        [encode_embeddings(matrix)[3], None],
        None,
    )


async def test_a_batch_above_one_mget_is_read_in_pipelined_chunks(
    redis_client: redis.Redis, async_redis_client: redis.asyncio.Redis
) -> None:
    users, matrix = _users(6000), _matrix(6000)
    EmbeddingStore(redis_client).write_embeddings("v1", users, matrix)
    redis_client.set(meta_key(users[-1]), encode_meta(3.5, {}))
    wanted = [*users[::-1], "nobody"]  # with meta keys: 12,002 keys, two MGETs
    raws, metas = await AsyncEmbeddingStore(async_redis_client).read_batch(
        "v1", wanted, with_meta=True
    )
    decoded, found = decode_rows(raws, DIM)
    assert found.tolist() == [True] * 6000 + [False]
    np.testing.assert_array_equal(decoded[:-1], matrix[::-1])
    assert np.isnan(decoded[-1]).all()
    assert metas is not None and decode_meta(metas[0])[0] == 3.5 and metas[1] is None


def test_decode_rows_names_the_first_value_of_the_wrong_length() -> None:
    good = encode_embeddings(_matrix(2))
    with pytest.raises(CorruptEmbeddingError, match="value 2 is 3 bytes"):
        decode_rows([good[0], None, b"abc", good[1]], DIM)
    half = encode_embeddings(_matrix(2), "float16")
    matrix, found = decode_rows([None, half[1]], DIM, "float16")
    assert found.tolist() == [False, True] and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[1], decode_embedding(half[1], DIM, "float16"))
    assert np.isnan(matrix[0]).all()
