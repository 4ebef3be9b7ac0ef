//! The whole suite, once per enabled backend: `flex::…`, `ndarray::…`, `wgpu::…`.

mod common;

macro_rules! device_suite {
    ($name:ident, $device:expr) => {
        mod $name {
            #[allow(deprecated)] // Device::ndarray() is deprecated upstream; we still test it
            fn device() -> burn::tensor::Device {
                $device
            }
            device_suite!(@cases;
                t0_is_a_bit_exact,
                t1_is_b_bit_exact,
                whole_model_matches_reference,
                row_granularity_matches_reference,
                lerp_method_is_linear,
                orthogonal_pair_follows_the_circle,
                zero_tensor_gives_lerp,
                antiparallel_gives_lerp,
                identical_and_colinear_give_lerp,
                small_angles_are_continuous,
                huge_values_do_not_overflow,
                accuracy_bar_at_ten_million,
                fused_and_generic_paths_agree,
                row_shapes_at_the_kernel_limits,
                half_precision_is_f32_rounded_once,
                f64_tensors_are_computed_in_f64,
                invalid_t_is_error,
                invalid_config_is_error,
                shape_mismatch_is_error,
                broadcastable_shape_is_mismatch,
                missing_and_unexpected_params_are_errors,
                kind_mismatch_is_error,
                non_finite_is_error,
                device_mismatch_is_error,
                error_messages_name_the_parameter,
                duplicate_paths_are_errors,
                inputs_are_unchanged,
                discrete_params_and_flags_come_from_a,
                autodiff_params_are_fresh_leaves,
                stats_report_angles_and_branches,
                swapping_inputs_mirrors_t,
                results_stay_finite,
                angle_to_a_grows_with_t,
                schedule_gives_each_tensor_its_t,
                plan_lists_tensors_without_computing,
                report_summarises_and_warns_on_strangers,
                task_vectors_keep_their_norm,
                spherical_mean_of_n_models,
                sweep_merges_each_t_from_the_inputs,
                merge_into_matches_merge_bit_for_bit,
                merge_into_writes_over_a_and_spares_clones,
                merge_into_errors_hand_a_back,
                consuming_task_vectors_and_mean_match,
                progress_counts_every_tensor,
                cancelled_merges_leave_models_intact,
                mean_methods_match_their_formulas,
                karcher_of_fine_tunes_holds_the_bar,
                task_vectors_hold_the_bar_near_their_base,
                mean_fallbacks_and_errors,
                mean_of_extreme_magnitudes_and_a_base,
                mean_of_mixed_dtypes,
                mean_methods_on_models,
            );
        }
    };
    (@cases; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                crate::common::$case(&device());
            }
        )+
    };
}

#[cfg(feature = "flex")]
device_suite!(flex, burn::tensor::Device::flex());
#[cfg(feature = "ndarray")]
device_suite!(ndarray, burn::tensor::Device::ndarray());
#[cfg(feature = "wgpu")]
device_suite!(wgpu, burn::tensor::Device::wgpu(Default::default()));
