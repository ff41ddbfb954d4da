//! The Sparkplug B payload, as prost message types derived from Eclipse Tahu's
//! `sparkplug_b.proto` (package `org.eclipse.tahu.protobuf`, proto2), field numbers and types
//! exactly as there. prost does the wire format; nothing here parses bytes by hand.
//!
//! Only the parts sensorhub reads are declared: a metric's `metadata` and `properties`, and
//! the insides of data sets and templates beyond what names them in a dead letter, are left
//! out, and protobuf decoding skips their fields as unknown fields, as the format intends.

/// `Payload`: a timestamp (ms since the epoch), the metrics, and the sequence number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19")]
    pub value: Option<Value>,
}

/// `Payload.Metric.value`, the oneof.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
    #[prost(message, tag = "17")]
    DatasetValue(DataSet),
    #[prost(message, tag = "18")]
    TemplateValue(Template),
    #[prost(message, tag = "19")]
    ExtensionValue(Extension),
}

/// `Payload.DataSet`: its shape only (the rows are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSet {
    #[prost(uint64, optional, tag = "1")]
    pub num_of_columns: Option<u64>,
    #[prost(string, repeated, tag = "2")]
    pub columns: Vec<String>,
}

/// `Payload.Template`: what names it (its metrics and parameters are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Template {
    #[prost(string, optional, tag = "1")]
    pub version: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub template_ref: Option<String>,
    #[prost(bool, optional, tag = "5")]
    pub is_definition: Option<bool>,
}

/// `Payload.Metric.MetricValueExtension`: extensions only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Extension {}

/// The data types of `sparkplug_b.proto`'s `DataType` enum that sensorhub names.
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;

    /// The enum's name of a data type, for messages.
    pub fn name(datatype: u32) -> &'static str {
        const NAMES: [&str; 35] = [
            "Unknown",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Float",
            "Double",
            "Boolean",
            "String",
            "DateTime",
            "Text",
            "UUID",
            "DataSet",
            "Bytes",
            "File",
            "Template",
            "PropertySet",
            "PropertySetList",
            "Int8Array",
            "Int16Array",
            "Int32Array",
            "Int64Array",
            "UInt8Array",
            "UInt16Array",
            "UInt32Array",
            "UInt64Array",
            "FloatArray",
            "DoubleArray",
            "BooleanArray",
            "StringArray",
            "DateTimeArray",
        ];
        NAMES
            .get(datatype as usize)
            .copied()
            .unwrap_or("(undefined)")
    }
}
