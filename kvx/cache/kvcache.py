"""KVXCache: a transformers Cache whose layers hold a kvx store and a method's policy.

The model's attention layers call `cache.update(k, v, layer_idx)`, which here only hands the new keys and values
through: the kvx attention function (registered by the engine) then asks the layer to attend, append and evict.
The cache reports tokens seen from `get_seq_length()` (so positions keep counting under eviction) and
`(stored + q, seen - stored)` from `get_mask_sizes(q)`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvx.cache.dense import IndexStore
from kvx.cache.sliding import cap_logits, layer_parts
from kvx.kernels import reference


class KVXLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, cache: KVXCache, layer_idx: int, store, policy):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.store = store
        self.policy = policy
        self.is_initialized = True

    # transformers Cache-layer protocol -------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n = self.store.n
        return n + query_length, max(0, self.cache.get_seq_length() - n)

    def get_max_length(self) -> int:
        return -1

    # kvx ---------------------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scaling: float) -> torch.Tensor:
        """q [B, Hq, t, D]; k_new, v_new [B, Hkv, t, D] (after RoPE). Returns [B, Hq, t, D]."""
        cache = self.cache
        if cache.mode == "masked":
            return self.masked_attend(q, k_new, v_new, scaling)
        B, Hkv, t, _ = k_new.shape
        qpos = cache.step_pos  # [B, t]
        pos_new = qpos[:, None, :].expand(B, Hkv, t)
        policy, store = self.policy, self.store
        if policy is None:
            out, _ = store.attend(q, k_new, v_new, pos_new, qpos, scaling)
            cache.note_bytes(self.layer_idx, store, extra=cache.new_bytes(store, k_new))
            store.append(k_new, v_new, pos_new)
        else:
            policy.before_attend(store, t)
            probs = None
            if not policy.needs_probs:
                out, _ = store.attend(q, k_new, v_new, pos_new, qpos, scaling)
            elif store.probs_blocks and hasattr(policy, "probs_block"):
                policy.begin_probs(store, qpos, Hkv)  # the attention pass hands the probabilities over block by block
                out, _ = store.attend(q, k_new, v_new, pos_new, qpos, scaling, probs_fn=policy.probs_block,
                                      sums_fn=getattr(policy, "sums_block", None))
            else:
                out, probs = store.attend(q, k_new, v_new, pos_new, qpos, scaling, return_probs=True)
            cache.note_bytes(self.layer_idx, store, extra=cache.new_bytes(store, k_new))
            policy.observe(store, q, probs)
            store.append(k_new, v_new, pos_new)
            policy.on_append(store, t)
        if cache.rope_shifted:  # the rotary positions in use differ from the token indices
            store.rpos[:, :, store.n - t :] = cache.step_rope[:, None, :].to(store.rpos.dtype)
        cache.note_bytes(self.layer_idx, store)
        return out

    def masked_attend(self, q, k, v, scaling):
        """One parallel attention over a whole window with the mask the policy would have produced.

        The policy runs one query at a time against an IndexStore, exactly as in stream mode; the kept slots of
        every step are recorded in a [B, Hkv, T, budget + 1] table and turned into the mask with one scatter."""
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv
        qpos = self.cache.step_pos  # [B, T]
        policy = self.policy
        if policy is None:
            pos = qpos[:, None, :].expand(B, Hkv, T)
            allowed = reference.allowed_mask(pos, qpos)
            self.cache.masked_peak[self.layer_idx] = T
            return self.store.masked_attention(q, k, v, allowed, scaling, None)
        padded = bool((qpos < 0).any())
        closed = getattr(policy, "closed_mask", None)
        allowed = None if closed is None or padded else closed(qpos)
        if allowed is not None:  # the policy's mask has a closed form: no step-by-step run
            self.cache.masked_peak[self.layer_idx] = min(T, policy.budget)
            allowed = allowed.expand(B, Hkv, 1, T, T)
            causal = reference.allowed_mask(qpos[:, None, :].expand(B, Hkv, T), qpos)
            return self.store.masked_attention(q, k, v, allowed, scaling, causal & ~allowed)
        istore = IndexStore(k, qpos, bytes_per_token=2 * D * k.element_size())
        logits = None
        if policy.needs_probs:
            logits = reference.group_logits(q, k, scaling)
            logits = cap_logits(logits, getattr(self.store, "softcap", None)).float()
        width = min(T, getattr(policy, "budget", T)) + 1
        steps = torch.empty(B, Hkv, T, width, dtype=torch.long, device=q.device)
        peak = 0
        for i in range(T):
            policy.before_attend(istore, 1)
            istore.append_index(i, 1)  # the query's own slot: istore.idx is now what query i reads
            slots = istore.idx  # [B, Hkv, n]
            n = slots.shape[-1]
            if n > steps.shape[-1]:  # a policy that holds more than its budget per head (padded, as AdaKV)
                own = torch.arange(T, device=q.device).view(1, 1, T, 1).expand(B, Hkv, T, n - steps.shape[-1])
                steps = torch.cat([steps, own], dim=-1)  # extra columns: each row's own token (always allowed)
            masked = padded or not istore._all_real  # some slot may be padding, or marked unused (-1)
            row = steps[:, :, i]
            row[..., :n] = torch.where(istore.pos >= 0, slots, i) if masked else slots
            row[..., n:] = i
            peak = max(peak, n)
            probs = None
            if logits is not None:
                lg = logits[:, :, :, i, :].gather(-1, slots[:, :, None, :].expand(B, Hkv, g, n))
                if masked:
                    qp = qpos[:, i][:, None, None]
                    ok = ((istore.pos >= 0) & (istore.pos <= qp)) | (qp < 0)
                    lg = lg.masked_fill(~ok[:, :, None], float("-inf"))
                probs = torch.softmax(lg, dim=-1).to(q.dtype).view(B, Hq, 1, n)
            policy.observe(istore, q[:, :, i : i + 1], probs)
            policy.on_append(istore, 1)
            policy.end_step(istore)
        self.cache.masked_peak[self.layer_idx] = peak
        allowed = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)
        allowed.scatter_(-1, steps, True)
        pos = qpos[:, None, :].expand(B, Hkv, T)
        causal = reference.allowed_mask(pos, qpos)
        allowed = allowed[:, :, None] & causal
        evicted = causal & ~allowed
        return self.store.masked_attention(q, k, v, allowed, scaling, evicted)


class KVXCache(Cache):
    """One KVXLayer per transformer layer; tracks tokens seen and the bytes held."""

    def __init__(self, method, arch, batch_size: int, device, seq_len: int | None = None, mode: str = "stream"):
        self.method = method
        self.arch = arch
        self.mode = mode
        layers = [KVXLayer(self, i, *layer_parts(method, arch, i, seq_len)) for i in range(arch.n_layers)]
        super().__init__(layers=layers)
        self.device = torch.device(device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.step_pos: torch.Tensor | None = None
        if seq_len is not None:  # a full cache holds exactly the sequence: its buffers are sized once
            for layer in layers:
                reserve = getattr(layer.store, "reserve", None)
                if layer.policy is None and reserve is not None:
                    reserve(seq_len)
        self.step_rope: torch.Tensor | None = None
        self.rope_shifted = False
        self._slot_bytes = None
        self._bytes = [0] * arch.n_layers
        self._total = 0
        self.peak_bytes = 0
        self.masked_peak = [0] * arch.n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seen.max().item()) if self.seen.numel() else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    # bookkeeping -------------------------------------------------------------------------------------------------
    def new_bytes(self, store, k_new: torch.Tensor) -> int:
        """Bytes of the K and V of the new tokens held beside the store while they are attended (none for a store
        that `stages_new`: it wrote them into its own buffers, which its nbytes() counts)."""
        if getattr(store, "stages_new", False):
            return 0
        return 2 * k_new.numel() * k_new.element_size()

    def note_bytes(self, layer_idx: int, store, extra: int = 0) -> None:
        new = store.nbytes()
        self._total += new - self._bytes[layer_idx]  # a running sum: no pass over the layers on the decode path
        self._bytes[layer_idx] = new
        total = self._total + extra
        if total > self.peak_bytes:
            self.peak_bytes = total

    def nbytes(self) -> int:
        """Bytes of the payload held now, summed over layers from the tensors themselves."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def aux_nbytes(self) -> int:
        return sum(layer.store.aux_nbytes() for layer in self.layers)

    def lengths(self) -> list[int]:
        return [layer.store.n for layer in self.layers]

    def end_step(self, nll: torch.Tensor | None = None) -> None:
        """Called by the engine after each forward; nll [B, t] of the tokens just appended (if the method asks)."""
        for layer in self.layers:
            if layer.policy is None:
                continue
            if nll is not None:
                layer.policy.observe_token_nll(layer.store, nll)
            layer.policy.end_step(layer.store)
            new = layer.store.nbytes()
            self._total += new - self._bytes[layer.layer_idx]
            self._bytes[layer.layer_idx] = new

    def extra_stats(self) -> dict:
        """Counters beside the payload: policy score buffers, and the bits held as the QAQ paper counts them
        (codes at their width; scales, zero points, outliers and full-precision elements at 16 bits)."""
        score = sum(layer.policy.nbytes() for layer in self.layers if hasattr(layer.policy, "nbytes"))
        acct = {"elements": 0, "bits": 0, "key_code_bits": 0, "value_code_bits": 0, "quantized_elements": 0}
        for layer in self.layers:
            st = layer.store
            if hasattr(st, "bit_accounting"):
                a = st.bit_accounting()
            else:
                k = st.keys() if st.n else None
                e = 0 if k is None else 2 * k.numel()
                a = {"elements": e, "bits": 16 * e}
            for key, val in a.items():
                acct[key] = acct.get(key, 0) + int(val)
        return {"score_bytes": score, **{f"acct_{k}": v for k, v in acct.items()}}

    def masked_peak_bytes(self, batch_size: int) -> int:
        """Bytes held at each layer's peak in masked mode: a store that can say what it would hold (a quantized
        store: `masked_nbytes`) says so; otherwise the peak tokens at full precision."""
        a = self.arch
        per_token = batch_size * a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes
        total = 0
        for layer, peak in zip(self.layers, self.masked_peak):
            own = getattr(layer.store, "masked_nbytes", None)
            held = own(peak) if own is not None else None
            total += peak * per_token if held is None else held
        return total + sum(layer.store.state_nbytes() for layer in self.layers)
