// Province names as data carries them (pinyin, as the `ecommerce` generator writes them, or
// already in Chinese) to the feature names of the China map (echarts 4.9's map/json/china.json).

const PINYIN: Record<string, string> = {
  Beijing: "北京",
  Tianjin: "天津",
  Shanghai: "上海",
  Chongqing: "重庆",
  Hebei: "河北",
  Henan: "河南",
  Yunnan: "云南",
  Liaoning: "辽宁",
  Heilongjiang: "黑龙江",
  Hunan: "湖南",
  Anhui: "安徽",
  Shandong: "山东",
  Xinjiang: "新疆",
  Jiangsu: "江苏",
  Zhejiang: "浙江",
  Jiangxi: "江西",
  Hubei: "湖北",
  Guangxi: "广西",
  Gansu: "甘肃",
  Shanxi: "山西",
  "Inner Mongolia": "内蒙古",
  "Nei Mongol": "内蒙古",
  Neimenggu: "内蒙古",
  Shaanxi: "陕西",
  Jilin: "吉林",
  Fujian: "福建",
  Guizhou: "贵州",
  Guangdong: "广东",
  Qinghai: "青海",
  Tibet: "西藏",
  Xizang: "西藏",
  Sichuan: "四川",
  Ningxia: "宁夏",
  Hainan: "海南",
  Taiwan: "台湾",
  "Hong Kong": "香港",
  Hongkong: "香港",
  Macau: "澳门",
  Macao: "澳门",
};

const FEATURES = new Set(Object.values(PINYIN));

/** The map feature of a province name, or undefined when the name is unknown. */
export function mapName(name: string): string | undefined {
  const trimmed = name.trim();
  if (FEATURES.has(trimmed)) return trimmed;
  // "Guangdong Province", "guangdong", "Xinjiang Uygur": the first words that match.
  const plain = trimmed.replace(/\s+(province|sheng|shi|municipality|autonomous region)$/i, "");
  for (const [k, v] of Object.entries(PINYIN)) {
    if (k.toLowerCase() === plain.toLowerCase()) return v;
  }
  const stripped = trimmed.replace(/(省|市|自治区|壮族自治区|回族自治区|维吾尔自治区|特别行政区)$/, "");
  return FEATURES.has(stripped) ? stripped : undefined;
}
