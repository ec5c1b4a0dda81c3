/*
 * ort_abi.h: a minimal, hand-written declaration of the onnxruntime C ABI, pinned to
 * ORT_API_VERSION 17 (onnxruntime 1.17+; any newer runtime serves version 17).
 *
 * onnxruntime's Python wheel ships no headers, so this file declares only what
 * lutcompile's custom-op library (and its C smoke test) use.  The facts come from the
 * public onnxruntime_c_api.h; nothing here is copied from it.
 *
 * OrtApi is a table of function pointers that only ever grows at the end: a slot's index
 * never changes.  Slots we call are declared with their real signature and a comment
 * "[index]"; every other slot is an opaque void* placeholder so the indices stay right.
 * The _Static_asserts at the end pin each declared slot to its index.
 *
 * OrtCustomOp is declared with every field that exists at version 17 (through
 * GetEndVersion).  Fields added by later versions (GetMayInplace, ... at 18) are only read
 * by onnxruntime when OrtCustomOp.version says they exist.
 */
#ifndef LUTCOMPILE_ORT_ABI_H
#define LUTCOMPILE_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ORT_API_VERSION 17

#ifdef _WIN32
#define ORT_API_CALL __stdcall
#else
#define ORT_API_CALL
#endif

/* ---- opaque runtime objects ---- */
typedef struct OrtEnv OrtEnv;
typedef struct OrtStatus OrtStatus; /* NULL means success */
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtSession OrtSession;
typedef struct OrtValue OrtValue;
typedef struct OrtRunOptions OrtRunOptions;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtTypeInfo OrtTypeInfo; /* a session input's or output's type */
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtShapeInferContext OrtShapeInferContext;
typedef struct OrtAllocator OrtAllocator; /* only passed around by pointer here */
typedef struct OrtCustomOp OrtCustomOp;

/* ---- enums (values are part of the ABI) ---- */
typedef enum ONNXTensorElementDataType {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING = 8,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE = 11,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 = 12,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 = 13,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX64 = 14,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_COMPLEX128 = 15,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN = 17,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FNUZ = 18,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2 = 19,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2FNUZ = 20
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
    ORT_OK = 0,
    ORT_FAIL = 1,
    ORT_INVALID_ARGUMENT = 2,
    ORT_NO_SUCHFILE = 3,
    ORT_NO_MODEL = 4,
    ORT_ENGINE_ERROR = 5,
    ORT_RUNTIME_EXCEPTION = 6,
    ORT_INVALID_PROTOBUF = 7,
    ORT_MODEL_LOADED = 8,
    ORT_NOT_IMPLEMENTED = 9,
    ORT_INVALID_GRAPH = 10,
    ORT_EP_FAIL = 11
} OrtErrorCode;

typedef enum OrtLoggingLevel {
    ORT_LOGGING_LEVEL_VERBOSE = 0,
    ORT_LOGGING_LEVEL_INFO = 1,
    ORT_LOGGING_LEVEL_WARNING = 2,
    ORT_LOGGING_LEVEL_ERROR = 3,
    ORT_LOGGING_LEVEL_FATAL = 4
} OrtLoggingLevel;

typedef enum OrtAllocatorType {
    OrtInvalidAllocator = -1,
    OrtDeviceAllocator = 0,
    OrtArenaAllocator = 1
} OrtAllocatorType;

typedef enum OrtMemType {
    OrtMemTypeCPUInput = -2,
    OrtMemTypeCPUOutput = -1,
    OrtMemTypeCPU = -1,
    OrtMemTypeDefault = 0
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
    INPUT_OUTPUT_REQUIRED = 0,
    INPUT_OUTPUT_OPTIONAL = 1,
    INPUT_OUTPUT_VARIADIC = 2
} OrtCustomOpInputOutputCharacteristic;

/* ---- entry points ---- */
typedef struct OrtApi OrtApi;

typedef struct OrtApiBase {
    const OrtApi *(ORT_API_CALL *GetApi)(uint32_t version); /* NULL if version unsupported */
    const char *(ORT_API_CALL *GetVersionString)(void);
} OrtApiBase;

/* exported by libonnxruntime (used by the smoke test, not by the custom-op library) */
typedef const OrtApiBase *(ORT_API_CALL *OrtGetApiBaseFn)(void);

/* what a custom-op library exports as "RegisterCustomOps" */
typedef OrtStatus *(ORT_API_CALL *RegisterCustomOpsFn)(OrtSessionOptions *options,
                                                       const OrtApiBase *api);

/* ---- the API table, by index ---- */
struct OrtApi {
    OrtStatus *(ORT_API_CALL *CreateStatus)(OrtErrorCode code, const char *msg);  /* [0] */
    OrtErrorCode (ORT_API_CALL *GetErrorCode)(const OrtStatus *status);          /* [1] */
    const char *(ORT_API_CALL *GetErrorMessage)(const OrtStatus *status);        /* [2] */
    OrtStatus *(ORT_API_CALL *CreateEnv)(OrtLoggingLevel level, const char *logid,
                                         OrtEnv **out);                          /* [3] */
    void *slots_4_6[3];                                                          /* [4..6] */
    OrtStatus *(ORT_API_CALL *CreateSession)(const OrtEnv *env, const char *model_path,
                                             const OrtSessionOptions *options,
                                             OrtSession **out);                  /* [7] */
    void *slot_8;                                                                /* [8] */
    OrtStatus *(ORT_API_CALL *Run)(OrtSession *session, const OrtRunOptions *run_options,
                                   const char *const *input_names,
                                   const OrtValue *const *inputs, size_t input_len,
                                   const char *const *output_names, size_t output_names_len,
                                   OrtValue **outputs);                          /* [9] */
    OrtStatus *(ORT_API_CALL *CreateSessionOptions)(OrtSessionOptions **options); /* [10] */
    void *slots_11_23[13];                                                       /* [11..23] */
    OrtStatus *(ORT_API_CALL *SetIntraOpNumThreads)(OrtSessionOptions *options,
                                                    int intra_op_num_threads);   /* [24] */
    void *slot_25;                                                               /* [25] */
    OrtStatus *(ORT_API_CALL *CreateCustomOpDomain)(const char *domain,
                                                    OrtCustomOpDomain **out);    /* [26] */
    OrtStatus *(ORT_API_CALL *CustomOpDomain_Add)(OrtCustomOpDomain *custom_op_domain,
                                                  const OrtCustomOp *op);        /* [27] */
    OrtStatus *(ORT_API_CALL *AddCustomOpDomain)(OrtSessionOptions *options,
                                                 OrtCustomOpDomain *custom_op_domain); /* [28] */
    void *slot_29;                                                               /* [29] */
    OrtStatus *(ORT_API_CALL *SessionGetInputCount)(const OrtSession *session,
                                                    size_t *out);                /* [30] */
    OrtStatus *(ORT_API_CALL *SessionGetOutputCount)(const OrtSession *session,
                                                     size_t *out);               /* [31] */
    void *slot_32;                                                               /* [32] */
    OrtStatus *(ORT_API_CALL *SessionGetInputTypeInfo)(const OrtSession *session, size_t index,
                                                       OrtTypeInfo **type_info); /* [33] */
    void *slots_34_35[2];                                                        /* [34..35] */
    OrtStatus *(ORT_API_CALL *SessionGetInputName)(const OrtSession *session, size_t index,
                                                   OrtAllocator *allocator,
                                                   char **value);                /* [36] */
    OrtStatus *(ORT_API_CALL *SessionGetOutputName)(const OrtSession *session, size_t index,
                                                    OrtAllocator *allocator,
                                                    char **value);               /* [37] */
    void *slots_38_47[10];                                                       /* [38..47] */
    OrtStatus *(ORT_API_CALL *CreateTensorAsOrtValue)(OrtAllocator *allocator,
                                                      const int64_t *shape, size_t shape_len,
                                                      ONNXTensorElementDataType type,
                                                      OrtValue **out);           /* [48] */
    OrtStatus *(ORT_API_CALL *CreateTensorWithDataAsOrtValue)(
        const OrtMemoryInfo *info, void *p_data, size_t p_data_len, const int64_t *shape,
        size_t shape_len, ONNXTensorElementDataType type, OrtValue **out);       /* [49] */
    OrtStatus *(ORT_API_CALL *IsTensor)(const OrtValue *value, int *out);        /* [50] */
    OrtStatus *(ORT_API_CALL *GetTensorMutableData)(OrtValue *value, void **out); /* [51] */
    void *slots_52_54[3];                                                        /* [52..54] */
    /* out is owned by type_info (do not release it); NULL if the type is not a tensor */
    OrtStatus *(ORT_API_CALL *CastTypeInfoToTensorInfo)(const OrtTypeInfo *type_info,
                                                        const OrtTensorTypeAndShapeInfo **out); /* [55] */
    void *slots_56_59[4];                                                        /* [56..59] */
    OrtStatus *(ORT_API_CALL *GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info,
                                                    ONNXTensorElementDataType *out); /* [60] */
    OrtStatus *(ORT_API_CALL *GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info,
                                                  size_t *out);                  /* [61] */
    OrtStatus *(ORT_API_CALL *GetDimensions)(const OrtTensorTypeAndShapeInfo *info,
                                             int64_t *dim_values,
                                             size_t dim_values_length);          /* [62] */
    void *slot_63;                                                               /* [63] */
    OrtStatus *(ORT_API_CALL *GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo *info,
                                                          size_t *out);          /* [64] */
    OrtStatus *(ORT_API_CALL *GetTensorTypeAndShape)(const OrtValue *value,
                                                     OrtTensorTypeAndShapeInfo **out); /* [65] */
    void *slots_66_68[3];                                                        /* [66..68] */
    OrtStatus *(ORT_API_CALL *CreateCpuMemoryInfo)(OrtAllocatorType type, OrtMemType mem_type,
                                                   OrtMemoryInfo **out);         /* [69] */
    void *slots_70_75[6];                                                        /* [70..75] */
    OrtStatus *(ORT_API_CALL *AllocatorFree)(OrtAllocator *allocator, void *p);  /* [76] */
    void *slot_77;                                                               /* [77] */
    OrtStatus *(ORT_API_CALL *GetAllocatorWithDefaultOptions)(OrtAllocator **out); /* [78] */
    void *slots_79_84[6];                                                        /* [79..84] */
    OrtStatus *(ORT_API_CALL *KernelInfoGetAttribute_float)(const OrtKernelInfo *info,
                                                            const char *name,
                                                            float *out);         /* [85] */
    OrtStatus *(ORT_API_CALL *KernelInfoGetAttribute_int64)(const OrtKernelInfo *info,
                                                            const char *name,
                                                            int64_t *out);       /* [86] */
    void *slot_87;                                                               /* [87] */
    OrtStatus *(ORT_API_CALL *KernelContext_GetInputCount)(const OrtKernelContext *context,
                                                           size_t *out);         /* [88] */
    OrtStatus *(ORT_API_CALL *KernelContext_GetOutputCount)(const OrtKernelContext *context,
                                                            size_t *out);        /* [89] */
    OrtStatus *(ORT_API_CALL *KernelContext_GetInput)(const OrtKernelContext *context,
                                                      size_t index,
                                                      const OrtValue **out);     /* [90] */
    OrtStatus *(ORT_API_CALL *KernelContext_GetOutput)(OrtKernelContext *context,
                                                       size_t index,
                                                       const int64_t *dim_values,
                                                       size_t dim_count,
                                                       OrtValue **out);          /* [91] */
    void (ORT_API_CALL *ReleaseEnv)(OrtEnv *input);                              /* [92] */
    void (ORT_API_CALL *ReleaseStatus)(OrtStatus *input);                        /* [93] */
    void (ORT_API_CALL *ReleaseMemoryInfo)(OrtMemoryInfo *input);                /* [94] */
    void (ORT_API_CALL *ReleaseSession)(OrtSession *input);                      /* [95] */
    void (ORT_API_CALL *ReleaseValue)(OrtValue *input);                          /* [96] */
    void *slot_97;                                                               /* [97] */
    void (ORT_API_CALL *ReleaseTypeInfo)(OrtTypeInfo *input);                    /* [98] */
    void (ORT_API_CALL *ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *input); /* [99] */
    void (ORT_API_CALL *ReleaseSessionOptions)(OrtSessionOptions *input);        /* [100] */
    void (ORT_API_CALL *ReleaseCustomOpDomain)(OrtCustomOpDomain *input);        /* [101] */
    void *slots_102_161[60];                                                     /* [102..161] */
    OrtStatus *(ORT_API_CALL *KernelInfoGetAttributeArray_float)(const OrtKernelInfo *info,
                                                                 const char *name, float *out,
                                                                 size_t *size);  /* [162] */
    OrtStatus *(ORT_API_CALL *KernelInfoGetAttributeArray_int64)(const OrtKernelInfo *info,
                                                                 const char *name, int64_t *out,
                                                                 size_t *size);  /* [163] */
    void *slots_164_227[64];                                                     /* [164..227] */
    OrtStatus *(ORT_API_CALL *RegisterCustomOpsLibrary_V2)(OrtSessionOptions *options,
                                                           const char *library_name); /* [228] */
    void *slot_229;                                                              /* [229] */
    OrtStatus *(ORT_API_CALL *KernelInfo_GetInputCount)(const OrtKernelInfo *info,
                                                        size_t *out);            /* [230] */
    OrtStatus *(ORT_API_CALL *KernelInfo_GetOutputCount)(const OrtKernelInfo *info,
                                                         size_t *out);           /* [231] */
    void *slots_232_235[4];                                                      /* [232..235] */
    OrtStatus *(ORT_API_CALL *KernelInfoGetAttribute_tensor)(const OrtKernelInfo *info,
                                                             const char *name,
                                                             OrtAllocator *allocator,
                                                             OrtValue **out);    /* [236] */
    void *slots_237_243[7];                                                      /* [237..243] */
    OrtStatus *(ORT_API_CALL *KernelInfo_GetNodeName)(const OrtKernelInfo *info, char *out,
                                                      size_t *size);             /* [244] */
    void *slots_245_253[9];                                                      /* [245..253] */
    const char *(ORT_API_CALL *GetBuildInfoString)(void);                        /* [254] */
    void *slots_255_273[19];                                                     /* [255..273] */
    OrtStatus *(ORT_API_CALL *KernelContext_ParallelFor)(const OrtKernelContext *context,
                                                         void (*fn)(void *, size_t),
                                                         size_t total, size_t num_batch,
                                                         void *usr_data);        /* [274] */
    /* later slots exist in newer runtimes; nothing past [274] is used */
};

/* ---- the custom-op description, version-17 layout ---- */
struct OrtCustomOp {
    uint32_t version; /* must be ORT_API_VERSION (17): tells onnxruntime which fields exist */
    void *(ORT_API_CALL *CreateKernel)(const OrtCustomOp *op, const OrtApi *api,
                                       const OrtKernelInfo *info);
    const char *(ORT_API_CALL *GetName)(const OrtCustomOp *op);
    const char *(ORT_API_CALL *GetExecutionProviderType)(const OrtCustomOp *op);
    ONNXTensorElementDataType (ORT_API_CALL *GetInputType)(const OrtCustomOp *op, size_t index);
    size_t (ORT_API_CALL *GetInputTypeCount)(const OrtCustomOp *op);
    ONNXTensorElementDataType (ORT_API_CALL *GetOutputType)(const OrtCustomOp *op, size_t index);
    size_t (ORT_API_CALL *GetOutputTypeCount)(const OrtCustomOp *op);
    void (ORT_API_CALL *KernelCompute)(void *op_kernel, OrtKernelContext *context);
    void (ORT_API_CALL *KernelDestroy)(void *op_kernel);
    /* since version 8 */
    OrtCustomOpInputOutputCharacteristic (ORT_API_CALL *GetInputCharacteristic)(
        const OrtCustomOp *op, size_t index);
    OrtCustomOpInputOutputCharacteristic (ORT_API_CALL *GetOutputCharacteristic)(
        const OrtCustomOp *op, size_t index);
    /* since version 13 */
    OrtMemType (ORT_API_CALL *GetInputMemoryType)(const OrtCustomOp *op, size_t index);
    /* since version 14 */
    int (ORT_API_CALL *GetVariadicInputMinArity)(const OrtCustomOp *op);
    int (ORT_API_CALL *GetVariadicInputHomogeneity)(const OrtCustomOp *op);
    int (ORT_API_CALL *GetVariadicOutputMinArity)(const OrtCustomOp *op);
    int (ORT_API_CALL *GetVariadicOutputHomogeneity)(const OrtCustomOp *op);
    /* since version 16: preferred over CreateKernel / KernelCompute when non-NULL */
    OrtStatus *(ORT_API_CALL *CreateKernelV2)(const OrtCustomOp *op, const OrtApi *api,
                                              const OrtKernelInfo *info, void **kernel);
    OrtStatus *(ORT_API_CALL *KernelComputeV2)(void *op_kernel, OrtKernelContext *context);
    /* since version 17 */
    OrtStatus *(ORT_API_CALL *InferOutputShapeFn)(const OrtCustomOp *op,
                                                  OrtShapeInferContext *ctx); /* may be NULL */
    int (ORT_API_CALL *GetStartVersion)(const OrtCustomOp *op);
    int (ORT_API_CALL *GetEndVersion)(const OrtCustomOp *op);
};

/* ---- layout checks: each declared slot at its index ---- */
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define ORT_ABI_SLOT(name, index)                                                     \
    _Static_assert(offsetof(OrtApi, name) == (index) * sizeof(void *),                 \
                   "OrtApi slot " #name " must be at index " #index)
ORT_ABI_SLOT(CreateStatus, 0);
ORT_ABI_SLOT(GetErrorCode, 1);
ORT_ABI_SLOT(GetErrorMessage, 2);
ORT_ABI_SLOT(CreateEnv, 3);
ORT_ABI_SLOT(CreateSession, 7);
ORT_ABI_SLOT(Run, 9);
ORT_ABI_SLOT(CreateSessionOptions, 10);
ORT_ABI_SLOT(SetIntraOpNumThreads, 24);
ORT_ABI_SLOT(CreateCustomOpDomain, 26);
ORT_ABI_SLOT(CustomOpDomain_Add, 27);
ORT_ABI_SLOT(AddCustomOpDomain, 28);
ORT_ABI_SLOT(CreateTensorAsOrtValue, 48);
ORT_ABI_SLOT(CreateTensorWithDataAsOrtValue, 49);
ORT_ABI_SLOT(IsTensor, 50);
ORT_ABI_SLOT(GetTensorMutableData, 51);
ORT_ABI_SLOT(GetTensorElementType, 60);
ORT_ABI_SLOT(GetDimensionsCount, 61);
ORT_ABI_SLOT(GetDimensions, 62);
ORT_ABI_SLOT(GetTensorShapeElementCount, 64);
ORT_ABI_SLOT(GetTensorTypeAndShape, 65);
ORT_ABI_SLOT(CreateCpuMemoryInfo, 69);
ORT_ABI_SLOT(GetAllocatorWithDefaultOptions, 78);
ORT_ABI_SLOT(KernelInfoGetAttribute_float, 85);
ORT_ABI_SLOT(KernelInfoGetAttribute_int64, 86);
ORT_ABI_SLOT(KernelContext_GetInputCount, 88);
ORT_ABI_SLOT(KernelContext_GetOutputCount, 89);
ORT_ABI_SLOT(KernelContext_GetInput, 90);
ORT_ABI_SLOT(KernelContext_GetOutput, 91);
ORT_ABI_SLOT(ReleaseEnv, 92);
ORT_ABI_SLOT(ReleaseStatus, 93);
ORT_ABI_SLOT(ReleaseMemoryInfo, 94);
ORT_ABI_SLOT(ReleaseSession, 95);
ORT_ABI_SLOT(ReleaseValue, 96);
ORT_ABI_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
ORT_ABI_SLOT(ReleaseSessionOptions, 100);
ORT_ABI_SLOT(ReleaseCustomOpDomain, 101);
ORT_ABI_SLOT(KernelInfoGetAttributeArray_float, 162);
ORT_ABI_SLOT(KernelInfoGetAttributeArray_int64, 163);
ORT_ABI_SLOT(RegisterCustomOpsLibrary_V2, 228);
ORT_ABI_SLOT(KernelInfo_GetInputCount, 230);
ORT_ABI_SLOT(KernelInfo_GetOutputCount, 231);
ORT_ABI_SLOT(KernelInfoGetAttribute_tensor, 236);
ORT_ABI_SLOT(KernelInfo_GetNodeName, 244);
ORT_ABI_SLOT(GetBuildInfoString, 254);
ORT_ABI_SLOT(KernelContext_ParallelFor, 274);
/* used by the C serving host, custom_ops/host/lut_host.c */
ORT_ABI_SLOT(SessionGetInputCount, 30);
ORT_ABI_SLOT(SessionGetOutputCount, 31);
ORT_ABI_SLOT(SessionGetInputTypeInfo, 33);
ORT_ABI_SLOT(SessionGetInputName, 36);
ORT_ABI_SLOT(SessionGetOutputName, 37);
ORT_ABI_SLOT(CastTypeInfoToTensorInfo, 55);
ORT_ABI_SLOT(AllocatorFree, 76);
ORT_ABI_SLOT(ReleaseTypeInfo, 98);
_Static_assert(sizeof(OrtApi) == 275 * sizeof(void *), "OrtApi declared through slot 274");
_Static_assert(offsetof(OrtCustomOp, GetInputCharacteristic) == 10 * sizeof(void *),
               "OrtCustomOp layout");
_Static_assert(offsetof(OrtCustomOp, CreateKernelV2) == 17 * sizeof(void *),
               "OrtCustomOp layout");
_Static_assert(sizeof(OrtCustomOp) == 22 * sizeof(void *), "OrtCustomOp v17 size");
#undef ORT_ABI_SLOT
#endif

#ifdef __cplusplus
}
#endif

#endif /* LUTCOMPILE_ORT_ABI_H */
