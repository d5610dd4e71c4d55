"""The mask head: Mask2Former's pixel decoder and OISA's single-query decoder carried from frame to frame."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskPredictor,
    Mask2FormerMLPPredictionHead,
    Mask2FormerPixelDecoder,
    Mask2FormerSinePositionEmbedding,
)
from transformers.utils import ModelOutput

from .configuration_oisa import OisaConfig
from .deformable_attention import OisaMultiscaleDeformableAttention, forward_in_float32


@dataclass
class OisaQueryDecoderOutput(ModelOutput):
    r"""
    class_logits (`torch.Tensor` of shape `(num_queries, num_frames, 2)`):
        Presence logits of each frame: index 0 "object present", index 1 "no object".
    mask_logits (`torch.Tensor` of shape `(num_queries, num_frames, height, width)`):
        Mask logits of each frame at a quarter of the input resolution.
    query_content (`torch.Tensor` of shape `(1, num_queries, hidden_dim)`):
        The query state after the last frame, from which the next frame starts.
    intermediate_queries (`torch.Tensor` of shape `(num_frames, num_layers + 1, num_queries, hidden_dim)`, *optional*):
        The content query fed to each prediction-head call, before the final norm.
    intermediate_class_logits (`torch.Tensor` of shape `(num_frames, num_layers + 1, num_queries, 2)`, *optional*):
        Presence logits of each prediction-head call.
    intermediate_mask_logits (`torch.Tensor` of shape `(num_frames, num_layers + 1, num_queries, height, width)`, *optional*):
        Mask logits of each prediction-head call.
    """

    class_logits: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    query_content: torch.Tensor | None = None
    intermediate_queries: torch.Tensor | None = None
    intermediate_class_logits: torch.Tensor | None = None
    intermediate_mask_logits: torch.Tensor | None = None


class OisaQueryDecoderLayer(GradientCheckpointingLayer):
    """Masked cross-attention from the query to one feature level, then an FFN; both post-norm. No self-attention."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0)
        self.cross_attn_layer_norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden_dim)
        self.final_layer_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        query: torch.Tensor,
        query_position: torch.Tensor,
        memory: torch.Tensor,
        memory_position: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        query, query_position (1, Q, C); memory, memory_position (HW, 1, C), shared by the queries; attention_mask
        (heads, Q, HW) with True where attention is blocked.
        """
        # the queries attend to the same memory and not to each other: as one sequence of Q queries they need one
        # projection of the memory instead of Q
        query = query.transpose(0, 1)
        attended = self.cross_attn(
            query + query_position.transpose(0, 1),
            memory + memory_position,
            memory,
            attn_mask=attention_mask,
            need_weights=False,
        )[0]
        query = self.cross_attn_layer_norm(query + attended)
        query = self.final_layer_norm(query + self.fc2(nn.functional.relu(self.fc1(query))))
        return query.transpose(0, 1)


class OisaQueryDecoder(nn.Module):
    """
    Mask2Former's masked-attention decoder reduced to what OISA uses: one query per `[SEG]` hidden state (its
    projection gives the query position and the initial content), cross-attention and FFN layers cycling over three
    feature levels, and a query state carried from each frame to the next.
    """

    def __init__(self, config: OisaConfig):
        super().__init__()
        hidden_dim = config.mask_hidden_dim
        self.hidden_dim = hidden_dim
        self.num_heads = config.mask_num_heads
        self.num_levels = 3
        self.seg_token_projection = Mask2FormerMLPPredictionHead(
            config.text_config.hidden_size, config.seg_token_projection_dim, 2 * hidden_dim, num_layers=2
        )
        self.position_embedding = Mask2FormerSinePositionEmbedding(num_position_features=hidden_dim // 2, normalize=True)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.layers = nn.ModuleList(
            [
                OisaQueryDecoderLayer(hidden_dim, config.mask_num_heads, config.query_decoder_ffn_dim)
                for _ in range(config.query_decoder_layers)
            ]
        )
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.class_predictor = nn.Linear(hidden_dim, 2)
        self.mask_predictor = Mask2FormerMaskPredictor(hidden_dim, config.mask_num_heads, config.mask_feature_dim)

    def initial_queries(self, seg_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, text_hidden) -> query position and initial query content, each (1, Q, hidden_dim)."""
        projected = self.seg_token_projection(seg_hidden_states)
        return projected[None, :, : self.hidden_dim], projected[None, :, self.hidden_dim :]

    def predict(
        self, query_content: torch.Tensor, mask_features: torch.Tensor, target_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Presence logits (Q, 2), mask logits (Q, h, w) and the attention mask for the next layer."""
        normed = self.layer_norm(query_content)
        class_logits = self.class_predictor(normed)[0]
        num_queries = query_content.shape[1]
        mask_logits, attention_mask = self.mask_predictor(
            normed, mask_features[None].expand(num_queries, -1, -1, -1), target_size
        )
        return class_logits, mask_logits[:, 0], attention_mask

    def forward(
        self,
        query_content: torch.Tensor,
        query_position: torch.Tensor,
        mask_features: torch.Tensor,
        multi_scale_features: list[torch.Tensor],
        output_intermediate: bool = False,
    ) -> OisaQueryDecoderOutput:
        """
        query_content, query_position (1, Q, C); mask_features (T, C, H, W); multi_scale_features three maps
        (T, C, h_l, w_l), lowest resolution first. Frames are decoded in order, each starting from the previous
        frame's final query state.
        """
        dtype = query_content.dtype
        # contiguous once here: the adapter's maps, and so the mask features, come out channels-last, and each of
        # the 1 + layers mask predictions of a frame would otherwise copy its frame to multiply it in bfloat16
        mask_features = mask_features.to(dtype=dtype, memory_format=torch.contiguous_format)
        num_queries = query_content.shape[1]
        size_list = [tuple(level_map.shape[-2:]) for level_map in multi_scale_features]
        # per level: (T, C, h, w) -> (h*w, T, C), positions shared by every frame
        sources, positions = [], []
        for level, level_map in enumerate(multi_scale_features):
            level_map = level_map.to(dtype)
            position = self.position_embedding(level_map[:1].shape, level_map.device, dtype)
            positions.append(position.flatten(2).permute(2, 0, 1))
            sources.append(level_map.flatten(2).permute(2, 0, 1) + self.level_embed.weight[level][None, None])

        class_logits, mask_logits = [], []
        queries_seen, classes_seen, masks_seen = [], [], []
        for frame in range(mask_features.shape[0]):
            frame_classes, frame_masks, attention_mask = self.predict(
                query_content, mask_features[frame], size_list[0]
            )
            if output_intermediate:
                queries_seen.append([query_content[0]])
                classes_seen.append([frame_classes])
                masks_seen.append([frame_masks])
            for index, layer in enumerate(self.layers):
                level = index % self.num_levels
                # a query that may attend nowhere attends everywhere instead
                attention_mask = attention_mask.masked_fill(attention_mask.all(-1, keepdim=True), False)
                # (Q*heads, 1, HW) -> (heads, Q, HW): the queries as one sequence over the frame's memory
                attention_mask = attention_mask.view(num_queries, self.num_heads, -1).transpose(0, 1)
                memory = sources[level][:, frame : frame + 1]
                query_content = layer(query_content, query_position, memory, positions[level], attention_mask)
                frame_classes, frame_masks, attention_mask = self.predict(
                    query_content, mask_features[frame], size_list[(index + 1) % self.num_levels]
                )
                if output_intermediate:
                    queries_seen[-1].append(query_content[0])
                    classes_seen[-1].append(frame_classes)
                    masks_seen[-1].append(frame_masks)
            class_logits.append(frame_classes)
            mask_logits.append(frame_masks)

        output = OisaQueryDecoderOutput(
            class_logits=torch.stack(class_logits, dim=1),
            mask_logits=torch.stack(mask_logits, dim=1),
            query_content=query_content,
        )
        if output_intermediate:
            output.intermediate_queries = torch.stack([torch.stack(calls) for calls in queries_seen])
            output.intermediate_class_logits = torch.stack([torch.stack(calls) for calls in classes_seen])
            output.intermediate_mask_logits = torch.stack([torch.stack(calls) for calls in masks_seen])
        return output


class OisaMaskHead(nn.Module):
    """Pixel decoder over the adapter's four maps, then the query decoder driven by `[SEG]` hidden states."""

    def __init__(self, config: OisaConfig):
        super().__init__()
        self.pixel_decoder_in_float32 = config.deformable_attention_fp32
        self.chunk_size = config.mask_head_chunk_size
        self.pixel_decoder = Mask2FormerPixelDecoder(
            config.pixel_decoder_config(), feature_channels=[config.mask_head_in_channels] * 4
        )
        # route the pixel decoder's deformable attention through the module the adapter uses (same weight names)
        for layer in self.pixel_decoder.encoder.layers:
            layer.self_attn = OisaMultiscaleDeformableAttention(
                config.mask_hidden_dim, config.mask_num_heads, n_levels=3, n_points=4
            )
            # the feed-forward's ReLU in place, on fc1's fresh output (fc1's backward does not need it)
            layer.activation_fn = torch.relu_
        self.query_decoder = OisaQueryDecoder(config)

    def decode_pixels(self, image_maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Four maps (T, C, H/4, W/4) ... (T, C, H/32, W/32) -> mask features (T, C', H/4, W/4) and three maps."""
        if self.pixel_decoder_in_float32:
            decoded = forward_in_float32(self.pixel_decoder, list(image_maps))
        else:
            # the adapter's maps come out float32 (its output norms compute in float32): the decoder's dtype here
            dtype = self.pixel_decoder.mask_projection.weight.dtype
            decoded = self.pixel_decoder([level_map.to(dtype) for level_map in image_maps])
        return decoded.mask_features, list(decoded.multi_scale_features)

    def forward(
        self,
        seg_hidden_states: torch.Tensor,
        image_maps: list[torch.Tensor],
        chunk_size: int | None = None,
        output_intermediate: bool = False,
    ) -> OisaQueryDecoderOutput:
        """
        seg_hidden_states (Q, text_hidden): one query each, all over the same frames. image_maps: the adapter's four
        maps of T frames in temporal order. Frames go through the pixel decoder `chunk_size` at a time, the query
        carried across chunks, so the result does not depend on the chunk size.
        """
        chunk_size = chunk_size or self.chunk_size
        query_position, query_content = self.query_decoder.initial_queries(seg_hidden_states)
        num_frames = image_maps[0].shape[0]
        chunk_outputs = []
        for start in range(0, num_frames, chunk_size):
            mask_features, multi_scale_features = self.decode_pixels(
                [level_map[start : start + chunk_size] for level_map in image_maps]
            )
            chunk_output = self.query_decoder(
                query_content, query_position, mask_features, multi_scale_features, output_intermediate
            )
            query_content = chunk_output.query_content
            chunk_outputs.append(chunk_output)
        return OisaQueryDecoderOutput(
            class_logits=torch.cat([out.class_logits for out in chunk_outputs], dim=1),
            mask_logits=torch.cat([out.mask_logits for out in chunk_outputs], dim=1),
            query_content=query_content,
            intermediate_queries=_cat_optional([out.intermediate_queries for out in chunk_outputs]),
            intermediate_class_logits=_cat_optional([out.intermediate_class_logits for out in chunk_outputs]),
            intermediate_mask_logits=_cat_optional([out.intermediate_mask_logits for out in chunk_outputs]),
        )


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors, dim=0)
