"""A BERT classifier that reads the mean of the token states, as sentence-transformers bases are trained.

``BertForSequenceClassification`` classifies from the ``[CLS]`` token through the pooler (dense +
tanh). A sentence-transformers base such as all-MiniLM-L6-v2 was trained to produce the *mean* of
its token states instead; its ``[CLS]`` token and pooler were never trained for that. This class
keeps every parameter name of ``BertForSequenceClassification`` (``bert.*``, ``classifier.*``,
the unused pooler included), so adapters, merges and exports map tensors exactly as for the CLS
head; only the forward differs:

    pooled = Σ_t mask_t · h_t / Σ_t mask_t          (h = last hidden state, mask = attention mask)
    logits = classifier(dropout(pooled))

This file imports only torch and transformers. ``edgelora merge`` copies it verbatim into a merged
folder as ``modeling_edgelora.py``, names :class:`MergedBertMeanPooling` and its config in ``config.json``'s
``auto_map`` and gives the folder the ``model_type`` ``"bert-mean-pooling"``, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

loads the merged model with this forward, and loading it without ``trust_remote_code`` is refused by
transformers (an unknown model type with custom code) instead of silently running the CLS head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_CONFIG_FIELD = "edgelora_pooling"
MERGED_MODEL_TYPE = "bert-mean-pooling"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, seq, dim) over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class BertForSequenceClassificationMeanPooling(BertForSequenceClassification):
    """``BertForSequenceClassification`` whose classifier reads the masked mean of the token states."""

    pooling = "mean"  # what exporters read to know the head (they do not import this module)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What the classifier reads (exporters tracing their own encoder call this)."""
        return mean_pool(hidden, attention_mask)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        kwargs.pop("return_dict", None)
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        pooled = self.pool(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = MSELoss()(logits.squeeze(), labels.squeeze()) if self.num_labels == 1 \
                    else MSELoss()(logits, labels)
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class BertMeanPoolingConfig(BertConfig):
    """BERT's config under its own ``model_type``: a merged mean-pooling folder that transformers cannot map
    to its own classes (so it never runs the CLS head on these weights)."""

    model_type = MERGED_MODEL_TYPE


class MergedBertMeanPooling(BertForSequenceClassificationMeanPooling):
    """What a merged folder loads as (``auto_map``): the same forward, under :class:`BertMeanPoolingConfig`."""

    config_class = BertMeanPoolingConfig
