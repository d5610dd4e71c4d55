"""The ViT-Adapter that turns InternViT into a four-scale feature pyramid for the mask head."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import InternVLVisionModel
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_oisa import OisaConfig
from .deformable_attention import OisaMultiscaleDeformableAttention, cell_centre_reference_points, forward_in_float32


class OisaChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, computed in float32."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normalized = F.layer_norm(
            hidden_states.float().permute(0, 2, 3, 1),
            self.normalized_shape,
            self.weight.float(),
            self.bias.float(),
            self.eps,
        )
        return normalized.permute(0, 3, 1, 2).to(hidden_states.dtype)


def _conv_norm_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        OisaChannelsFirstLayerNorm(out_channels, eps=1e-6),
        nn.ReLU(),
    ]


class OisaSpatialPriorModule(nn.Module):
    """Convolution stem that gives the adapter its queries at strides 4, 8, 16 and 32 of the image."""

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_norm_relu(3, inplanes, stride=2),
            *_conv_norm_relu(inplanes, inplanes, stride=1),
            *_conv_norm_relu(inplanes, inplanes, stride=1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_norm_relu(inplanes, 2 * inplanes, stride=2))
        self.conv3 = nn.Sequential(*_conv_norm_relu(2 * inplanes, 4 * inplanes, stride=2))
        self.conv4 = nn.Sequential(*_conv_norm_relu(4 * inplanes, 4 * inplanes, stride=2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the stride-4 map (B, C, H/4, W/4) and the stride 8/16/32 maps."""
        stride4 = self.stem(pixel_values)
        stride8 = self.conv2(stride4)
        stride16 = self.conv3(stride8)
        stride32 = self.conv4(stride16)
        return self.fc1(stride4), self.fc2(stride8), self.fc3(stride16), self.fc4(stride32)


class OisaDepthwiseConv(nn.Module):
    """3x3 depthwise convolution applied separately to the stride 8, 16 and 32 groups of the query tokens."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, hidden_states: torch.Tensor, grid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        batch_size, _, channels = hidden_states.shape
        groups = hidden_states.split([height * width for height, width in grid_sizes], dim=1)
        outputs = []
        for group, (height, width) in zip(groups, grid_sizes):
            # (B, h*w, C) -> (B, C, h, w) -> conv -> (B, h*w, C)
            group = group.transpose(1, 2).reshape(batch_size, channels, height, width)
            outputs.append(self.dwconv(group).flatten(2).transpose(1, 2))
        return torch.cat(outputs, dim=1)


class OisaConvFeedForward(nn.Module):
    """The extractor FFN: linear, depthwise conv per scale, GELU, linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = OisaDepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor, grid_sizes: list[tuple[int, int]]) -> torch.Tensor:
        hidden_states = self.act(self.dwconv(self.fc1(hidden_states), grid_sizes))
        return self.fc2(hidden_states)


class OisaExtractorAttention(nn.Module):
    """Normalised deformable attention from the adapter queries to the ViT patch tokens."""

    def __init__(self, dim: int, num_heads: int, n_points: int, ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = OisaMultiscaleDeformableAttention(dim, num_heads, n_levels=1, n_points=n_points, ratio=ratio)

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
    ) -> torch.Tensor:
        output, _ = self.attn(
            self.query_norm(query),
            encoder_hidden_states=self.feat_norm(features),
            reference_points=reference_points,
            spatial_shapes_list=spatial_shapes_list,
        )
        return output


class OisaAdapterExtractor(GradientCheckpointingLayer):
    """Updates the multi-scale queries from the ViT tokens: deformable attention then a convolutional FFN."""

    def __init__(self, config: OisaConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.attention_in_float32 = config.deformable_attention_fp32
        self.attention = OisaExtractorAttention(
            dim, config.adapter_deform_num_heads, config.adapter_n_points, config.adapter_deform_ratio
        )
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = OisaConvFeedForward(dim, int(dim * config.adapter_cffn_ratio))

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        grid_sizes: list[tuple[int, int]],
    ) -> torch.Tensor:
        if self.attention_in_float32:
            attended = forward_in_float32(self.attention, query, features, reference_points, spatial_shapes_list)
        else:
            attended = self.attention(query, features, reference_points, spatial_shapes_list)
        query = query + attended.to(query.dtype)
        return query + self.ffn(self.ffn_norm(query), grid_sizes)


class OisaViTAdapter(nn.Module):
    """
    ViT-Adapter without injectors: the ViT stream is left unchanged, and after each slice of ViT layers an extractor
    pulls the patch tokens into queries at strides 8, 16 and 32. Output: four maps at strides 4, 8, 16 and 32 with the
    ViT's width, plus the ViT's last hidden state for the LLM.
    """

    def __init__(self, config: OisaConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.interaction_indexes = [tuple(pair) for pair in config.adapter_interaction_indexes]
        self.patch_size = config.vision_config.patch_size[0]
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spatial_prior = OisaSpatialPriorModule(config.adapter_conv_inplane, dim)
        self.extractors = nn.ModuleList([OisaAdapterExtractor(config) for _ in self.interaction_indexes])
        self.extra_extractors = nn.ModuleList(
            [OisaAdapterExtractor(config) for _ in range(config.adapter_num_extra_extractors)]
        )
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.output_norms = nn.ModuleList([OisaChannelsFirstLayerNorm(dim, eps=1e-6) for _ in range(4)])

    def forward(
        self, pixel_values: torch.Tensor, vision_tower: InternVLVisionModel
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Runs `vision_tower` layer by layer with the extractors in between. Returns the ViT's last hidden state
        (B, 1 + patches, C) and the four float32 maps (B, C, H/4, W/4) ... (B, C, H/32, W/32).
        """
        batch_size, _, height, width = pixel_values.shape
        grid_sizes = [(height // 8, width // 8), (height // 16, width // 16), (height // 32, width // 32)]
        vit_grid = (height // self.patch_size, width // self.patch_size)

        stride4, stride8, stride16, stride32 = self.spatial_prior(pixel_values)
        queries = torch.cat(
            [
                level_map.flatten(2).transpose(1, 2) + self.level_embed[level]
                for level, level_map in enumerate((stride8, stride16, stride32))
            ],
            dim=1,
        )
        reference_points = cell_centre_reference_points(grid_sizes, pixel_values.device, torch.float32)
        reference_points = reference_points[None, :, None, :].expand(batch_size, -1, -1, -1)

        hidden_states = vision_tower.embeddings(pixel_values)
        for block, (first, last) in enumerate(self.interaction_indexes):
            for layer in vision_tower.encoder.layer[first : last + 1]:
                hidden_states = layer(hidden_states)
            extractors = [self.extractors[block]]
            if block == len(self.interaction_indexes) - 1:
                extractors += list(self.extra_extractors)
            for extractor in extractors:
                queries = extractor(queries, hidden_states[:, 1:], reference_points, [vit_grid], grid_sizes)

        # (B, sum(h*w), C) -> three maps at strides 8, 16, 32
        maps = [
            part.transpose(1, 2).reshape(batch_size, -1, grid_h, grid_w)
            for part, (grid_h, grid_w) in zip(
                queries.split([h * w for h, w in grid_sizes], dim=1), grid_sizes
            )
        ]
        # the sum takes the layout of its first term: the stride-4 map is channels-last, `up`'s output is not for a
        # single image, and the float32 norm below reads a channels-last map in a third of the time
        maps = [stride4 + self.up(maps[0]), *maps]

        vit_map = hidden_states[:, 1:].transpose(1, 2).reshape(batch_size, -1, *vit_grid)
        vit_map = F.interpolate(vit_map, size=grid_sizes[1], mode="bilinear", align_corners=False)
        scales = [4.0, 2.0, 1.0, 0.5]
        maps = [
            level_map
            + (vit_map if scale == 1.0 else F.interpolate(vit_map, scale_factor=scale, mode="bilinear", align_corners=False))
            for level_map, scale in zip(maps, scales)
        ]
        return hidden_states, [norm(level_map.float()) for norm, level_map in zip(self.output_norms, maps)]
