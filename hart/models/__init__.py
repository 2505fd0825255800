"""The three models of HART: hybrid tokenizer, scale-wise transformer, residual diffusion head."""
import logging


class _EmptyFp32ListFilter(logging.Filter):
    """Drop diffusers' "modules ... should be kept in float32: []" notice.

    `ModelMixin.to(dtype)` logs it on every cast even when the list of such modules is empty (ours is),
    so it says nothing to a user; the notice with a non-empty list still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())
